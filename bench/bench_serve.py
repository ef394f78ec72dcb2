"""`huabi serve` overhead and throughput on the built-in model.

    .venv/bin/python bench/bench_serve.py [--steps 8] [--images 4] [--clients 8] [--jobs-per-client 2]

1. Time per image through the A1111 API (`/sdapi/v1/txt2img`, one request at a
   time, base64 PNG returned) vs the engine called directly in this process
   (`Engine.generate` with the same request, PNG written), measured in the same
   run; the ratio is API / engine.
2. Jobs per minute with ``--clients`` concurrent A1111 clients, each sending
   ``--jobs-per-client`` requests; jobs run one at a time on the one device, so
   this shows the queue's overhead under contention, not parallel speed-up.

The server runs as a child process on 127.0.0.1 with a fresh data dir; API and
engine images alternate (the server is idle while the engine runs), so a change
in machine load during the run affects both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # server_process: the test suite's child-process server

PROMPT = "a lighthouse on a cliff at sunset"


def payload(seed: int, steps: int, size: int) -> dict:
    return {"prompt": PROMPT, "seed": seed, "steps": steps, "width": size, "height": size,
            "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": 7}


class EngineTimer:
    """The engine called directly in this process, with the same request the API builds."""

    def __init__(self, steps: int, size: int, out: Path) -> None:
        from huabi.service.engine import Engine

        self.steps, self.size, self.out = steps, size, out
        self.engine = Engine(device="cpu", dtype="fp32")
        self.engine.load(None)
        self.time(0)  # warm-up

    def time(self, seed: int) -> float:
        from huabi.core.request import GenerationRequest

        request = GenerationRequest(prompt=PROMPT, seed=seed, steps=self.steps, width_px=self.size,
                                    height_px=self.size, schedule="Karras")
        start = time.perf_counter()
        self.engine.generate(request, out_dir=self.out)
        return time.perf_counter() - start


def time_api(url: str, seed: int, steps: int, size: int) -> float:
    start = time.perf_counter()
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=payload(seed, steps, size), timeout=600)
    response.raise_for_status()
    assert response.json()["images"], "no image returned"
    return time.perf_counter() - start


def concurrent_jobs(url: str, steps: int, size: int, clients: int, per_client: int) -> dict:
    errors: list[str] = []
    progress_latency: list[float] = []
    done = threading.Event()

    def client(index: int) -> None:
        for job in range(per_client):
            seed = 1000 + index * per_client + job
            response = requests.post(f"{url}/sdapi/v1/txt2img", json=payload(seed, steps, size), timeout=1200)
            if response.status_code != 200 or json.loads(response.json()["info"])["all_seeds"] != [seed]:
                errors.append(f"client {index} job {job}: {response.status_code}")

    def poll_progress() -> None:
        while not done.is_set():
            start = time.perf_counter()
            requests.get(f"{url}/sdapi/v1/progress", timeout=60).raise_for_status()
            progress_latency.append(time.perf_counter() - start)
            time.sleep(0.25)

    poller = threading.Thread(target=poll_progress)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    poller.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    jobs = clients * per_client
    return {"clients": clients, "jobs": jobs, "wall_s": wall, "jobs_per_min": 60 * jobs / wall, "errors": errors,
            "progress_median_ms": 1000 * statistics.median(progress_latency) if progress_latency else None,
            "progress_max_ms": 1000 * max(progress_latency) if progress_latency else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (huabi-mini's native size: 128)")
    parser.add_argument("--images", type=int, default=4, help="images timed each way (after one warm-up)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from server_process import ServerProcess

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "models").mkdir()
        server = ServerProcess(tmp_path / "data", tmp_path / "models").start()
        try:
            engine = EngineTimer(args.steps, args.size, tmp_path / "engine-out")
            time_api(server.url, 0, args.steps, args.size)  # warm-up: the server loads the model
            api_times, engine_times = [], []
            for index in range(args.images):  # interleaved, so a change in machine load hits both sides
                api_times.append(time_api(server.url, 100 + index, args.steps, args.size))
                engine_times.append(engine.time(100 + index))
            load = concurrent_jobs(server.url, args.steps, args.size, args.clients, args.jobs_per_client)
        finally:
            server.stop()
    api_s, engine_s = statistics.median(api_times), statistics.median(engine_times)
    result = {"steps": args.steps, "size": args.size, "api_s_per_image": api_s, "engine_s_per_image": engine_s,
              "ratio_api_to_engine": api_s / engine_s, "api_times": api_times, "engine_times": engine_times,
              "concurrent": load, "serial_jobs_per_min_from_engine": 60 / engine_s}
    print(f"per image ({args.size}px, {args.steps} steps): API {api_s:.2f} s, engine {engine_s:.2f} s, "
          f"ratio {api_s / engine_s:.3f}")
    print(f"{load['clients']} concurrent clients: {load['jobs']} jobs in {load['wall_s']:.1f} s = "
          f"{load['jobs_per_min']:.1f} jobs/min (engine alone, serial: {60 / engine_s:.1f}/min); "
          f"/progress median {load['progress_median_ms']:.0f} ms, max {load['progress_max_ms']:.0f} ms; "
          f"errors: {len(load['errors'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
