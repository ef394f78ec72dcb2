"""``huabi serve --ray``: the queue's jobs run on Ray workers (issue 21); the queue, API and gallery stay.

The queue (jobs.py) stores and claims jobs as before and asks this executor how many can run at
once (the cluster's live worker slots); each claimed job goes to one worker through ``RayPool``.
The worker sends back PNG bytes and infotext; they are written here under the names a local run
gives (``next_image_path``: ``00012-<seed>.png``) and the queue records them in the gallery as it
records local images.

What travels to a worker: the job's options, the head's input files (uploads) as bytes, the model
files' sizes and SHA-256 (the worker checks its copy on the shared storage against them) and the
torch thread count (see ``threads``). Never a model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from huabi.errors import HuabiError
from huabi.server.ray_pool import Dispatch, RayPool, Task
from huabi.server.ray_worker import (
    EngineWorker,
    Fingerprint,
    check_fingerprints,
    fingerprint,
    input_files,
    model_refs,
    place_inputs,
    png_answer,
    set_threads,
    write_image,
)
from huabi.server.runner import ImageResult, JobStopped, RunControl, Runner, RunnerConfig
from huabi.server.store import Job


class ServerWorker(EngineWorker):
    """The worker of ``huabi serve --ray``: the CLI's batch prompts and the server's jobs, the latter
    through the server's own Runner (so a PNG made on a worker is the PNG ``huabi serve`` makes)."""

    def __init__(self) -> None:
        super().__init__()
        self._runner: Runner | None = None

    def run_server_job(self, token: str, kind: str, options: dict, config, inputs: dict[str, bytes],
                       fingerprints: list[Fingerprint], threads: int) -> dict:
        """A ``huabi serve`` job through the server's Runner, into a scratch folder; the PNGs come back as bytes.
        ``inputs``: the bytes of the head's input files, keyed as :func:`input_files` keys them."""
        control = self.new_control(token)
        try:
            with self.lock, tempfile.TemporaryDirectory(prefix="huabi-worker-") as scratch:
                set_threads(threads)
                check_fingerprints(fingerprints, Path(config.models_dir), self.ready()["name"])
                if self._runner is None or self._runner.config != config:
                    self._runner = None  # free the previous engine first
                    self._runner = Runner(config)
                options = place_inputs(options, inputs, Path(scratch) / "inputs")

                def on_progress(done: int, total: int, phase: str) -> None:
                    control.done, control.total, control.phase = done, total, phase

                run_control = RunControl(on_progress=on_progress, stop=control.stop, skip=control.skip)
                out = Path(scratch) / "out"
                try:
                    results, stopped = self._runner.run(kind, options, out, run_control), False
                except JobStopped as err:
                    results, stopped = getattr(err, "results", []), True
                return {"images": [png_answer(r.path, r.seed, r.infotext) for r in results], "stopped": stopped}
        finally:
            self.end_control(token)




class RayExecutor:
    """``threads``: torch's CPU thread count on the workers. The last bit of a pixel depends on it, so
    by default it is this machine's, and a job's PNG is byte-identical to the one a local run makes."""

    def __init__(self, pool: RayPool, config: RunnerConfig, models_dir: Path, *, threads: int,
                 on_worker: Callable[[str, str], None] = lambda job_id, name: None) -> None:
        self.pool = pool
        self.config = dataclasses.replace(config, models_dir=Path(models_dir).resolve())
        self.threads = threads
        self.on_worker = on_worker
        self._fingerprints: dict[tuple, Fingerprint] = {}

    def capacity(self) -> int:
        return self.pool.capacity()

    def fingerprints(self, options: dict) -> list[Fingerprint]:
        """The head's model files of a job, hashed once per (file, size, mtime)."""
        from huabi.server.ray_worker import resolve_ref

        models_dir = Path(self.config.models_dir)
        found = []
        for role, ref in model_refs(options):
            path = resolve_ref(role, ref, models_dir)
            try:
                status = path.stat()
            except OSError:
                raise HuabiError(f"{role}: {path}: no such file on the head") from None
            key = (role, ref, str(path), status.st_size, status.st_mtime_ns)
            if key not in self._fingerprints:
                self._fingerprints[key] = fingerprint(role, ref, models_dir)
            found.append(self._fingerprints[key])
        return found

    def run(self, job: Job, out_dir: Path, control: RunControl) -> list[ImageResult]:
        inputs = {key: path.read_bytes() for key, path in input_files(job.options).items()}
        task = Task("run_server_job", (job.kind, job.options, self.config, inputs, self.fingerprints(job.options),
                                       self.threads), model=job.options.get("model"))
        dispatch = Dispatch(stop=control.stop, skip=control.skip, on_progress=control.on_progress,
                            on_worker=lambda name: self.on_worker(job.id, name))
        answer = self.pool.run(task, dispatch)
        results = [ImageResult(write_image(out_dir, image), image["seed"], image["infotext"])
                   for image in answer["images"]]
        if answer["stopped"]:
            stopped = JobStopped()
            stopped.results = results  # type: ignore[attr-defined]
            raise stopped
        return results


def make_executor(address: str | None, config: RunnerConfig, models_dir: Path, *, threads: int | None,
                  max_attempts: int, on_worker: Callable[[str, str], None]) -> RayExecutor:
    """Connect to the cluster and start matching workers to its slots."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    pool = RayPool(address, worker_class=ServerWorker, max_attempts=max_attempts).connect().start()
    return RayExecutor(pool, config, models_dir, threads=threads, on_worker=on_worker)
