"""``huabi generate --prompt-file prompts.txt --ray ADDRESS``: one prompt per worker job, outputs in order.

The prompts are read and checked here, exactly as a local run reads them (``jobs_from_args``);
each prompt is one task on a Ray worker (a ``ray_worker.EngineWorker``), which expands it and
makes its images as ``cmd_generate`` would. The PNG bytes come back and are written here in the
prompt file's order under the names a local run gives (``00000-<seed>.png``, ...): with a fixed
``--seed`` the folder is byte for byte the folder of a local run (workers use this machine's torch
thread count). Up to one prompt per live worker runs at a time; a worker lost mid-prompt makes the
prompt run again on another (``--ray-attempts``).
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huabi.errors import HuabiError

WAIT_FOR_WORKERS_S = 120.0


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray (docs/scale-out.md; needs the [ray] extra)")
    group.add_argument("--ray", metavar="ADDRESS", nargs="?", const="auto",
                       help="spread the prompts over the huabi workers of a Ray cluster (HOST:PORT of its head); "
                            "outputs are written here, in order, as a local run names them")
    group.add_argument("--ray-attempts", type=int, default=3, metavar="N",
                       help="runs of a prompt whose worker dies before the command fails (default 3)")


def generate_on_ray(args: argparse.Namespace, jobs: list) -> int:
    """``jobs``: ``jobs_from_args(args)``, every prompt checked before anything runs."""
    import torch

    from huabi.cli.flow_options import text_encoder_files
    from huabi.server.ray_pool import Dispatch, RayPool, Task
    from huabi.server.ray_worker import fingerprint, model_refs
    from huabi.service.model_files import default_models_dir

    if any(job.grid for job in jobs):
        raise HuabiError("--ray: Midjourney-style grids (--mj, prompt parameters) are not made on Ray workers; "
                         "run them locally")
    models_dir = Path(args.models_dir or default_models_dir()).expanduser().resolve()
    studio_settings = {
        "models_dir": str(models_dir), "device": args.device, "dtype": args.dtype,
        "embeddings_dir": _text(getattr(args, "embeddings_dir", None)),
        "base_model": _text(getattr(args, "base", None)),
        "gguf_on_the_fly": getattr(args, "gguf_on_the_fly", False), "backend": getattr(args, "backend", "auto"),
        "vae_decoder": getattr(args, "vae_decoder", "full"), "vae_tiling": getattr(args, "vae_tiling", False),
        "text_encoder_files": {k: str(v) for k, v in text_encoder_files(args).items()},
    }
    expand_settings = {"wildcards_dir": _text(getattr(args, "wildcards_dir", None)),
                       "combinatorial": bool(getattr(args, "combinatorial", False))}
    flow_extras = {"distilled_cfg": getattr(args, "distilled_cfg", None), "shift": getattr(args, "shift", None)}
    threads = torch.get_num_threads()
    hashed: dict = {}

    def fingerprints(request) -> list:
        options = {"model": request.model, "vae": request.vae, "refiner": request.refiner}
        found = []
        for role, ref in model_refs(options):
            if (role, ref) not in hashed:
                hashed[role, ref] = fingerprint(role, ref, models_dir)
            found.append(hashed[role, ref])
        return found

    tasks = [Task("run_prompt_job", (job, studio_settings, expand_settings, flow_extras,
                                     fingerprints(job.request), threads), model=job.request.model) for job in jobs]
    pool = RayPool(args.ray, max_attempts=args.ray_attempts).connect()
    try:
        pool.start()
        if pool.wait_for_workers(1, WAIT_FOR_WORKERS_S) == 0:
            raise HuabiError(f"--ray: no huabi worker joined the cluster in {WAIT_FOR_WORKERS_S:.0f} s; start one "
                             "with ray start --address HEAD:6379 --resources '{\"huabi_slot\": 1}'")
        if not args.quiet:
            print(f"huabi: {len(tasks)} prompt(s) on {pool.capacity()} Ray worker(s)"
                  f"{f' (dashboard: {pool.dashboard_url})' if pool.dashboard_url else ''}", file=sys.stderr)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=max(1, min(len(tasks), 64)), thread_name_prefix="huabi-ray") as threads_:
            futures = [threads_.submit(pool.run, task, Dispatch(stop=stop)) for task in tasks]
            try:
                for job, future in zip(jobs, futures):
                    answer = future.result()
                    if job.mj.ignored:
                        print(f"huabi: note: ignored {', '.join(job.mj.ignored)} (they pick Midjourney's own "
                              "models; huabi uses the model you load)", file=sys.stderr)
                    write_in_order(answer, args.out)
            except BaseException:
                stop.set()  # Ctrl-C or a failed prompt: the others stop on their workers
                for future in futures:
                    future.cancel()
                raise
    finally:
        pool.close()
    return 0


def write_in_order(answer: dict, out: Path) -> None:
    from huabi.server.ray_worker import write_image

    for image in answer["images"]:
        print(write_image(Path(out), image), flush=True)


def _text(value) -> str | None:
    return None if value is None else str(value)
