"""The head's view of a Ray cluster: one engine worker (a Ray actor) per huabi device slot, and
dispatch with model affinity, retries on worker loss, progress and cancellation.

Slots are a Ray custom resource: a machine joins with
``ray start --address HEAD:6379 --resources '{"huabi_slot": N}'`` (N = its GPUs, or 1 for a CPU
node). Every few seconds the pool compares the cluster's slots with its actors: a node that joins
(or a worker that died on a live node) gets a new actor, a node that left loses its actors. So a
late-joining machine gets work without restarting anything.

A job goes to an idle worker that has its model loaded if there is one (loading is the slow part),
else to an idle worker with nothing loaded, else to any idle worker. A worker that dies mid-job
(killed process, lost node) makes the job run again on another worker, at most ``max_attempts``
times in all; then the job fails with the reason. A job's own error (bad input, missing model) is
not retried: it would fail the same way anywhere.

Ray is imported only when a pool connects (``huabi serve`` / ``generate`` without ``--ray`` never import it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from huabi.errors import HuabiError

log = logging.getLogger("huabi.ray")

SLOT_RESOURCE = "huabi_slot"
NAMESPACE = "huabi"


@dataclass(frozen=True)
class Task:
    """One call to make on a worker: ``EngineWorker.<method>(token, *args)``; ``model`` is the key for affinity."""

    method: str
    args: tuple
    model: str | None


@dataclass
class Slot:
    actor: object
    node_id: str
    name: str = "starting"
    ready_ref: object = None
    live: bool = False
    busy: bool = False
    model: str | None = None  # the model of the last job it ran: still loaded there
    gpus: float = 0.0


@dataclass
class Dispatch:
    """How a running task talks to the caller: stop/skip in, progress and worker name out."""

    stop: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[int, int, str], None] = lambda done, total, phase: None
    on_worker: Callable[[str], None] = lambda name: None


class WorkerLost(Exception):
    pass


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One clear line when nothing listens at HOST:PORT (the head's GCS port, 6379 by default)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise HuabiError(f"ray: address must be HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise HuabiError(f"ray: cannot connect to {address} ({err.strerror or err}); is `ray start --head` "
                         "running there?") from None


class RayPool:
    def __init__(self, address: str | None, *, worker_class: type | None = None, max_attempts: int = 3,
                 sync_every_s: float = 2.0, poll_every_s: float = 0.25) -> None:
        if max_attempts < 1:
            raise HuabiError(f"ray attempts: must be >= 1, got {max_attempts}")
        self.address = address
        self.max_attempts = max_attempts
        self.sync_every_s = sync_every_s
        self.poll_every_s = poll_every_s
        self.dashboard_url: str | None = None
        self._slots: list[Slot] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._ray = None
        self._worker_class = worker_class
        self._actor_class = None

    # -- lifecycle ------------------------------------------------------------------------

    def connect(self) -> "RayPool":
        try:
            import ray
        except ImportError:
            raise HuabiError("ray: not installed; pip install 'huabi[ray]' (the optional Ray extra)") from None
        from huabi import __version__
        from huabi.server.ray_worker import EngineWorker  # the CLI's batch worker; serve passes its own

        self._ray = ray
        address = None if self.address in (None, "", "auto") else self.address
        if address is not None:
            check_reachable(address)  # ray.init retries an unreachable head for minutes
        try:
            context = ray.init(address=address or "auto", namespace=NAMESPACE, logging_level=logging.ERROR,
                               log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = address or "the local cluster (RAY_ADDRESS or a `ray start --head` on this machine)"
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise HuabiError(f"ray: cannot connect to {where} ({reason})") from None
        url = getattr(context, "dashboard_url", None)
        self.dashboard_url = (url if url.startswith("http") else f"http://{url}") if url else None
        self._version = __version__
        # Threaded actor: progress/stop/skip calls are answered while a job runs.
        self._actor_class = ray.remote(self._worker_class or EngineWorker)
        return self

    def start(self) -> "RayPool":
        self.sync()
        self._thread = threading.Thread(target=self._sync_loop, name="huabi-ray-pool", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for slot in list(self._slots):
            self._kill(slot)
        self._slots = []

    def wait_for_workers(self, count: int = 1, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.capacity() < count and time.monotonic() < deadline and not self._closed.is_set():
                self._changed.wait(timeout=0.5)
        return self.capacity()

    # -- the slots ------------------------------------------------------------------------

    def capacity(self) -> int:
        return sum(1 for slot in self._slots if slot.live)

    def workers(self) -> list[dict]:
        return [{"name": slot.name, "live": slot.live, "busy": slot.busy, "model": slot.model}
                for slot in list(self._slots)]

    def _sync_loop(self) -> None:
        while not self._closed.wait(self.sync_every_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a transient GCS error must not end the loop
                log.exception("ray: could not read the cluster's nodes")

    def sync(self) -> None:
        """Match actors to the cluster's huabi slots; mark started actors live."""
        ray = self._ray
        wanted: dict[str, tuple[int, float]] = {}
        for node in ray.nodes():
            slots = int(node.get("Resources", {}).get(SLOT_RESOURCE, 0))
            if node.get("Alive") and slots > 0:
                gpus = node["Resources"].get("GPU", 0.0)
                wanted[node["NodeID"]] = (slots, 1.0 if gpus >= slots else 0.0)
        with self._changed:
            for slot in [s for s in self._slots if s.node_id not in wanted]:
                log.warning("ray: worker %s left (its node is gone)", slot.name)
                self._slots.remove(slot)
                slot.live = False
            for node_id, (count, gpus) in wanted.items():
                have = sum(1 for s in self._slots if s.node_id == node_id)
                for _ in range(count - have):
                    self._slots.append(self._new_slot(node_id, gpus))
            pending = [s for s in self._slots if not s.live and s.ready_ref is not None]
        if pending:
            done, _ = ray.wait([s.ready_ref for s in pending], num_returns=len(pending), timeout=0)
            for slot in pending:
                if slot.ready_ref in done:
                    self._became_ready(slot)
        with self._changed:
            self._changed.notify_all()

    def _new_slot(self, node_id: str, gpus: float) -> Slot:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = self._actor_class.options(
            resources={SLOT_RESOURCE: 1}, num_cpus=0, num_gpus=gpus, max_restarts=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()
        return Slot(actor=actor, node_id=node_id, ready_ref=actor.ready.remote(), gpus=gpus)

    def _became_ready(self, slot: Slot) -> None:
        try:
            info = self._ray.get(slot.ready_ref, timeout=10)
        except Exception as err:  # noqa: BLE001 - the actor died while starting: the next sync makes another
            log.warning("ray: a worker failed to start: %s", str(err).splitlines()[0] if str(err) else err)
            self._drop(slot)
            return
        slot.ready_ref = None
        if info["version"] != self._version:
            log.error("ray: worker %s runs huabi %s, the head %s: not used", info["name"], info["version"],
                      self._version)
            return  # kept (so no new actor is made for it) but never live
        slot.name, slot.live = info["name"], True
        log.warning("ray: worker %s ready", slot.name)

    def _drop(self, slot: Slot) -> None:
        with self._changed:
            slot.live = False
            if slot in self._slots:
                self._slots.remove(slot)
            self._changed.notify_all()

    def _kill(self, slot: Slot) -> None:
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    # -- dispatch -------------------------------------------------------------------------

    def _acquire(self, model: str | None, avoid: set[str], stop: threading.Event) -> Slot | None:
        with self._changed:
            while not stop.is_set() and not self._closed.is_set():
                idle = [s for s in self._slots if s.live and not s.busy]
                fresh = [s for s in idle if s.name not in avoid] or idle
                if fresh:
                    best = min(fresh, key=lambda s: (s.model != model, s.model is not None))
                    best.busy = True
                    return best
                self._changed.wait(timeout=0.5)
        return None

    def _release(self, slot: Slot) -> None:
        with self._changed:
            slot.busy = False
            self._changed.notify_all()

    def run(self, task: Task, dispatch: Dispatch) -> dict:
        """Run ``task`` on a worker, retried on another one when its worker dies. Returns the worker's
        answer; raises HuabiError when the job fails (its own error, or too many lost workers) and
        returns ``{"stopped": True, ...}`` from the worker when ``dispatch.stop`` ended it there."""
        ray = self._ray
        lost: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            slot = self._acquire(task.model, set(lost), dispatch.stop)
            if slot is None:
                return {"images": [], "stopped": True}
            dispatch.on_worker(slot.name)
            token = uuid.uuid4().hex
            try:
                answer = self._call(slot, token, task, dispatch)
            except WorkerLost as err:
                lost.append(slot.name)
                log.warning("ray: worker %s lost mid-job (attempt %d of %d): %s", slot.name, attempt,
                            self.max_attempts, err)
                self._drop(slot)
                continue
            except ray.exceptions.RayTaskError as err:
                self._release(slot)
                cause = err.cause if getattr(err, "cause", None) is not None else err
                if isinstance(cause, HuabiError):
                    raise HuabiError(str(cause).splitlines()[0]) from None
                raise HuabiError(f"worker {slot.name}: {type(cause).__name__}: "
                                 f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
            slot.model = task.model
            self._release(slot)
            return answer
        raise HuabiError(f"ray: the job's worker was lost {len(lost)} times ({', '.join(lost)}); "
                         f"gave up after {self.max_attempts} attempts")

    def _call(self, slot: Slot, token: str, task: Task, dispatch: Dispatch) -> dict:
        ray = self._ray
        ref = getattr(slot.actor, task.method).remote(token, *task.args)
        stop_sent = False
        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
        try:
            while True:
                done, _ = ray.wait([ref], timeout=self.poll_every_s)
                if done:
                    return ray.get(ref)
                if dispatch.stop.is_set() and not stop_sent:
                    slot.actor.stop.remote(token)
                    stop_sent = True
                if dispatch.skip.is_set():
                    dispatch.skip.clear()
                    slot.actor.skip.remote(token)
                try:
                    state = ray.get(slot.actor.progress.remote(token), timeout=5)
                except ray.exceptions.GetTimeoutError:
                    state = None
                if state is not None:
                    dispatch.on_progress(*state)
        except lost_errors as err:
            raise WorkerLost(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
