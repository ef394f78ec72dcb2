"""One huabi engine on one device slot of a Ray cluster: the actor that runs jobs for ``huabi serve --ray``
and ``huabi generate --ray``.

The class is plain Python (``ray_pool`` wraps it with ``ray.remote``), so importing this module
never imports Ray. A worker keeps its engine (and so its loaded model) between jobs; the head
sends job descriptions, never models: model files are read by path on storage the head and the
workers share, and before a job runs the worker checks that the file it sees at that path is the
head's file (size and SHA-256), so a stale or different copy is a clear error, not a different image.

Results go back as PNG bytes with their infotext: the head writes them into its own output folder
and gallery, under the names a local run gives.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huabi.errors import HuabiError

# Job options that hold a path to an input file the head wrote (the server's uploads, --from images).
INPUT_OPTIONS = ("image", "mask", "from_image")
CONTROL_INPUTS = ("image", "mask")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the head knows of a model file: the reference as the job names it, and the file's size and SHA-256."""

    role: str  # model, vae, refiner
    ref: str | None  # None: the built-in model
    size: int
    sha256: str


def model_refs(options: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """The (role, reference) pairs of the model files a job reads by path: checkpoint, VAE, refiner."""
    refs: list[tuple[str, str | None]] = [("model", options.get("model") or None)]
    for role in ("vae", "refiner"):
        if options.get(role):
            refs.append((role, str(options[role])))
    return refs


def resolve_ref(role: str, ref: str | None, models_dir: Path) -> Path:
    """The file a reference means on this machine (the same rule the engine loads by)."""
    from huabi.service.model_files import resolve_model_path

    if role == "vae":
        return Path(ref).expanduser()
    return resolve_model_path(ref, models_dir)


def fingerprint(role: str, ref: str | None, models_dir: Path) -> Fingerprint:
    from huabi.models.hashes import hashed_file, model_sha256

    path = resolve_ref(role, ref, models_dir)
    try:
        size = hashed_file(path).stat().st_size
    except OSError as err:
        raise HuabiError(f"{role}: {path}: cannot read it ({err.strerror or err})") from None
    return Fingerprint(role, ref, size, model_sha256(path))


def check_fingerprints(expected: list[Fingerprint], models_dir: Path, worker: str) -> None:
    """Refuse to run when this worker's copy of a model file is missing or differs from the head's."""
    for wanted in expected:
        try:
            mine = fingerprint(wanted.role, wanted.ref, models_dir)
        except HuabiError as err:
            raise HuabiError(f"{wanted.role}: worker {worker} cannot read it ({err}); models reach workers by "
                             f"path on shared storage: mount the head's models folder at the same path") from None
        if (mine.size, mine.sha256) != (wanted.size, wanted.sha256):
            path = resolve_ref(wanted.role, wanted.ref, models_dir)
            raise HuabiError(f"{wanted.role}: worker {worker} sees a different file at {path} (size {mine.size}, "
                             f"sha256 {mine.sha256[:10]}; the head's: size {wanted.size}, sha256 "
                             f"{wanted.sha256[:10]}); put the same file on the shared storage")


@dataclasses.dataclass
class _Control:
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    skip: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: int = 0
    total: int = 0
    phase: str = "loading"


class EngineWorker:
    """A Ray actor body: one engine, one job at a time; ``stop``/``skip``/``progress`` are answered
    while a job runs (the actor is threaded), so cancellation reaches the job on its worker.
    This class runs the CLI's batch prompts; ``ray_executor.ServerWorker`` adds the server's jobs."""

    def __init__(self) -> None:
        self._studio = None  # batch prompts: huabi.service.studio.Studio (the CLI's code path)
        self._studio_key: tuple | None = None
        self._controls: dict[str, _Control] = {}
        self.lock = threading.Lock()  # one job on the device at a time

    def new_control(self, token: str) -> _Control:
        control = self._controls[token] = _Control()
        return control

    def end_control(self, token: str) -> None:
        self._controls.pop(token, None)

    # -- what the head asks ---------------------------------------------------------------

    def ready(self) -> dict:
        from huabi import __version__

        return {"pid": os.getpid(), "host": socket.gethostname(), "version": __version__,
                "name": f"{_node_ip()} pid {os.getpid()}"}

    def progress(self, token: str) -> tuple[int, int, str] | None:
        control = self._controls.get(token)
        return None if control is None else (control.done, control.total, control.phase)

    def stop(self, token: str) -> bool:
        control = self._controls.get(token)
        if control is not None:
            control.stop.set()
        return control is not None

    def skip(self, token: str) -> bool:
        control = self._controls.get(token)
        if control is not None:
            control.skip.set()
        return control is not None

    # -- jobs -------------------------------------------------------------------------------

    def run_prompt_job(self, token: str, prompt_job, studio_settings: dict, expand_settings: dict,
                       flow_extras: dict, fingerprints: list[Fingerprint], threads: int) -> dict:
        """One prompt of ``huabi generate --prompt-file``, as cmd_generate runs it: expanded here (its
        size needs the loaded model), every request into a scratch folder; PNG bytes come back."""
        from types import SimpleNamespace

        from huabi.service.requests import with_flow_extras
        from huabi.service.progress import Cancellation
        from huabi.service.studio import Studio

        control = self.new_control(token)
        try:
            with self.lock, tempfile.TemporaryDirectory(prefix="huabi-worker-") as scratch:
                set_threads(threads)
                models_dir = Path(studio_settings["models_dir"])
                check_fingerprints(fingerprints, models_dir, self.ready()["name"])
                key = tuple(sorted((k, repr(v)) for k, v in studio_settings.items()))
                if self._studio is None or self._studio_key != key:
                    self._studio = None
                    self._studio = Studio(**studio_settings)
                    self._studio_key = key
                studio = self._studio
                cancel = Cancellation()
                watcher = threading.Thread(target=_forward_stop, args=(control.stop, cancel), daemon=True)
                watcher.start()
                requests = studio.expand(prompt_job, **expand_settings)
                extras = SimpleNamespace(**flow_extras)
                images: list[dict] = []
                stopped = False
                for index, request in enumerate(requests):
                    if control.stop.is_set():
                        stopped = True
                        break

                    def on_event(event, _index=index, _count=len(requests)) -> None:
                        control.done = _index * event.total + event.step
                        control.total = _count * event.total
                        control.phase = "sampling"

                    made = studio.run(with_flow_extras(request, extras), out_dir=Path(scratch), on_event=on_event,
                                      cancel=cancel)
                    images += [png_answer(r.path, r.seed, r.infotext) for r in made if r.path is not None]
                    if cancel.interrupted:
                        stopped = True
                        break
                control.stop.set()  # ends the watcher
                return {"images": images, "stopped": stopped}
        finally:
            self.end_control(token)


def input_files(options: Mapping[str, Any]) -> dict[str, Path]:
    """The input files a server job names (uploads the head wrote): key -> path."""
    files = {name: Path(options[name]) for name in INPUT_OPTIONS if options.get(name)}
    for index, unit in enumerate(options.get("controlnets") or ()):
        for name in CONTROL_INPUTS:
            if unit.get(name):
                files[f"controlnets.{index}.{name}"] = Path(unit[name])
    return files


def place_inputs(options: dict, inputs: Mapping[str, bytes], folder: Path) -> dict:
    """``options`` with each input path replaced by a copy of the head's bytes in ``folder``."""
    if not inputs:
        return options
    folder.mkdir(parents=True, exist_ok=True)
    options = dict(options)
    units = [dict(unit) for unit in options.get("controlnets") or ()]
    for key, data in inputs.items():
        original = Path(options[key]) if "." not in key else Path(units[int(key.split(".")[1])][key.split(".")[2]])
        path = folder / f"{key}{original.suffix or '.png'}"
        path.write_bytes(data)
        if "." in key:
            _, index, name = key.split(".")
            units[int(index)][name] = str(path)
        else:
            options[key] = str(path)
    if units:
        options["controlnets"] = units
    return options


def write_image(out_dir: Path, image: dict) -> Path:
    """A worker's PNG written under the next free name, atomically (temp file, fsync, rename over the claim)."""
    from huabi.models.files import new_file_mode
    from huabi.service.pngio import next_image_path, release_claim

    target = next_image_path(out_dir, image["seed"])
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(image["png"])
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, new_file_mode())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        release_claim(target)
        raise
    return Path(target)


def png_answer(path: Path, seed: int, infotext: str) -> dict:
    return {"name": Path(path).name, "seed": int(seed), "infotext": infotext, "png": Path(path).read_bytes()}


def set_threads(threads: int) -> None:
    """The head's torch thread count: the last bit of a pixel depends on it, and outputs must match a local run."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _forward_stop(stop: threading.Event, cancel) -> None:
    stop.wait()
    cancel.interrupt()


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a name for the logs only
        return socket.gethostname()
