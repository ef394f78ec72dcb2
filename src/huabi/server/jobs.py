"""The job queue: stored before acknowledged, run one at a time, in priority then arrival order.

Where a job runs is behind ``Executor`` (one method); ``LocalExecutor`` runs it
in this process through ``runner.Runner``. A scale-out executor (issue 21,
``ray_executor.RayExecutor``) also says how many jobs it can run at once
(``capacity``); the queue then runs that many, each in its own thread.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import queue as queue_module
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from huabi.errors import HuabiError
from huabi.server.runner import ImageResult, JobStopped, RunControl, Runner
from huabi.server.store import CANCELLED, DONE, FAILED, FINISHED, INTERRUPTED, Job, Store, new_job_id

log = logging.getLogger("huabi.server")


class QueueFull(HuabiError):
    pass


class Executor(Protocol):
    def run(self, job: Job, out_dir: Path, control: RunControl) -> list[ImageResult]:
        """Make the job's images into ``out_dir``; raise JobStopped when ``control.stop`` is set."""

    # Optional: ``capacity() -> int``, the jobs it can run at once (1 when absent; 0: none for now).


@dataclass
class LocalExecutor:
    runner: Runner

    def run(self, job: Job, out_dir: Path, control: RunControl) -> list[ImageResult]:
        return self.runner.run(job.kind, job.options, out_dir, control)

    def capacity(self) -> int:
        return 1


@dataclass
class Progress:
    """What /progress reports about the running job (read without a lock: a snapshot of plain values)."""

    job_id: str | None = None
    step: int = 0
    total: int = 0
    phase: str = "idle"
    started: float = 0.0
    preview: bytes | None = None  # PNG bytes of the live preview, when the engine provides one


@dataclass
class _Running:
    job: Job
    control: RunControl = field(default_factory=RunControl)
    interrupted: bool = False
    progress: Progress | None = None  # this job's own (``JobQueue.progress`` is the latest of any job)


class JobQueue:
    def __init__(self, store: Store, executor: Executor, data_dir: Path, *, max_queued: int = 100) -> None:
        self.store = store
        self.executor = executor
        self.data_dir = data_dir
        self.max_queued = max_queued
        self.progress = Progress()
        self._running: dict[str, _Running] = {}  # job id -> the running job (several with a scale-out executor)
        self._job_threads: list[threading.Thread] = []
        self._wake = threading.Condition()
        self._finished = threading.Condition()
        self._listeners: list[queue_module.Queue] = []
        self._listeners_lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a crash: jobs left running are reported failed, half-written files removed.
        Queued jobs simply run again (they are still 'queued' in the database)."""
        failed = self.store.fail_interrupted_runs()
        outputs = self.data_dir / "outputs"
        if outputs.is_dir():
            for leftover in outputs.rglob(".*.tmp"):  # save_png's temp files: a write cut short
                leftover.unlink(missing_ok=True)
        for job_id in failed:
            log.warning("job %s was running when the server stopped: reported failed", job_id)
        return failed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="huabi-queue", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            for running in list(self._running.values()):
                running.control.stop.set()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for thread in list(self._job_threads):
            thread.join(timeout=30)

    # -- client actions -----------------------------------------------------------------

    def new_id(self) -> str:
        return new_job_id()

    def check_room(self) -> None:
        if self.store.count_queued() >= self.max_queued:
            raise QueueFull(f"queue: {self.max_queued} jobs are waiting already; try again later")

    def submit(self, kind: str, options: dict, *, source: str, meta: dict | None = None, priority: int = 0,
               job_id: str | None = None) -> str:
        """Store the job (durably) and wake the worker; returns its id."""
        self.check_room()
        job_id = job_id or new_job_id()
        self.store.add_job(job_id, kind, options, source=source, meta=meta or {}, priority=priority)
        self._emit({"event": "queued", "job": job_id})
        with self._wake:
            self._wake.notify_all()
        return job_id

    def cancel(self, job_id: str) -> str | None:
        """Cancel one job: a queued one never runs, the running one stops. Its status, or None if unknown."""
        if self.store.cancel_queued(job_id):
            self._emit({"event": "finished", "job": job_id, "status": CANCELLED})
            with self._finished:
                self._finished.notify_all()
            return CANCELLED
        running = self._running.get(job_id)
        if running is not None:
            running.control.stop.set()
            return "cancelling"
        job = self.store.job(job_id)
        return job.status if job else None

    def interrupt_current(self) -> str | None:
        """A1111's /interrupt: stop only the running job (its finished images are kept)."""
        running = self._current()
        if running is None:
            return None
        running.interrupted = True
        running.control.stop.set()
        return running.job.id

    def skip_current(self) -> str | None:
        running = self._current()
        if running is None:
            return None
        running.control.skip.set()
        return running.job.id

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._finished:
            while True:
                job = self.store.job(job_id)
                if job is None or job.status in FINISHED:
                    return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return job
                self._finished.wait(timeout=min(remaining, 1.0) if remaining is not None else 1.0)

    def position(self, job_id: str) -> int | None:
        """0 for the running job, 1.. for queued ones in run order; None once finished."""
        if job_id in self._running:
            return 0
        waiting = sorted(self.store.jobs(("queued",), limit=10_000), key=lambda j: (-j.priority, j.seq))
        for index, job in enumerate(waiting, start=1):
            if job.id == job_id:
                return index
        return None

    def _current(self) -> _Running | None:
        """The job A1111's single-job routes mean: the one /progress shows, else the oldest running one."""
        running = dict(self._running)
        shown = running.get(self.progress.job_id) if self.progress.job_id else None
        return shown or min(running.values(), key=lambda r: r.job.seq, default=None)

    def progress_of(self, job_id: str) -> Progress | None:
        """A running job's progress (several run at once with a scale-out executor); None otherwise."""
        running = self._running.get(job_id)
        return running.progress if running is not None else None

    def listen(self) -> queue_module.Queue:
        listener: queue_module.Queue = queue_module.Queue(maxsize=1000)
        with self._listeners_lock:
            self._listeners.append(listener)
        return listener

    def unlisten(self, listener: queue_module.Queue) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _emit(self, event: dict) -> None:
        with self._listeners_lock:
            for listener in self._listeners:
                try:
                    listener.put_nowait(event)
                except queue_module.Full:  # a stalled client loses events, never blocks the worker
                    pass

    # -- the worker ---------------------------------------------------------------------

    def _capacity(self) -> int:
        capacity = getattr(self.executor, "capacity", None)
        return capacity() if capacity is not None else 1

    def _work(self) -> None:
        """Claim jobs while the executor has room; each runs in its own thread (one at a time locally)."""
        while True:
            with self._wake:
                while not self._stop:
                    job = self.store.claim_next() if len(self._running) < self._capacity() else None
                    if job is not None:
                        break
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
                running = self._running[job.id] = _Running(job)
            thread = threading.Thread(target=self._run_and_finish, args=(running,), name=f"huabi-job-{job.id[:8]}",
                                      daemon=True)
            self._job_threads = [t for t in self._job_threads if t.is_alive()] + [thread]
            thread.start()

    def _run_and_finish(self, running: _Running) -> None:
        finished = None
        try:
            finished = self._run(running)
        finally:
            with self._wake:
                self._running.pop(running.job.id, None)
                if self.progress.job_id == running.job.id:
                    self.progress = Progress()
                self._wake.notify_all()  # room for the next job
            with self._finished:
                self._finished.notify_all()
            if finished is not None:  # after the worker is idle, so listeners see the queue as it is
                self._emit(finished)

    def _run(self, running: _Running) -> dict:
        job = running.job
        started = time.time()
        self.progress = running.progress = Progress(job_id=job.id, phase="loading", started=started)
        self._emit({"event": "started", "job": job.id})

        def on_progress(done: int, total: int, phase: str) -> None:
            preview = self.progress.preview if self.progress.job_id == job.id else None
            self.progress = running.progress = Progress(job_id=job.id, step=done, total=total, phase=phase,
                                                        started=started, preview=preview)
            self._emit({"event": "progress", "job": job.id, "step": done, "total": total, "phase": phase})

        def on_preview(png: bytes) -> None:
            self.progress = dataclasses.replace(self.progress, preview=png)
            self._emit({"event": "preview", "job": job.id,
                        "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii")})

        running.control.on_progress = on_progress
        running.control.on_preview = on_preview
        out_dir = self.data_dir / "outputs" / time.strftime("%Y-%m-%d")
        status, error, results = DONE, None, []
        try:
            results = self.executor.run(job, out_dir, running.control)
        except JobStopped as stopped:
            results = getattr(stopped, "results", [])
            if self._stop:  # the server is shutting down: the job did not finish, say so
                status, error = FAILED, "the server stopped while this job ran; submit it again"
            elif running.interrupted:
                status, error = INTERRUPTED, "interrupted"
            else:
                status, error = CANCELLED, "cancelled while running"
        except HuabiError as err:
            status, error = FAILED, str(err).splitlines()[0] if str(err) else type(err).__name__
        except Exception as err:  # noqa: BLE001 - a job's crash must not take the worker down
            log.exception("job %s crashed", job.id)
            status, error = FAILED, f"internal error: {type(err).__name__}: {err}"
        image_ids = [self.record(result, job_id=job.id) for result in results]
        self.store.finish_job(job.id, status, error=error, images=image_ids)
        return {"event": "finished", "job": job.id, "status": status, "error": error, "images": image_ids}

    # -- gallery ------------------------------------------------------------------------

    def record(self, result: ImageResult, *, job_id: str | None = None) -> int:
        """Put one image file into the gallery (with a thumbnail); returns its gallery id."""
        return self.store.record(result.path, result.infotext, job_id=job_id)
