"""A real Ray cluster on 127.0.0.1 for the scale-out tests: a head and huabi worker nodes, each a
``ray start --block`` in its own session, torn down by killing exactly those sessions' processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_process import free_port

SRC = Path(__file__).resolve().parents[1] / "src"
RAY = Path(sys.executable).with_name("ray")


def ray_env(cache_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HUABI_AUTO_DTYPE="fp32",
               RAY_DISABLE_IMPORT_WARNING="1")
    if cache_dir is not None:
        env["HUABI_CACHE_DIR"] = str(cache_dir)
    return env


class RayCluster:
    def __init__(self, cache_dir: Path | None = None) -> None:
        # Short path: Ray's Unix sockets live under the temp dir (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = ray_env(cache_dir)
        self.nodes: list[subprocess.Popen] = []
        self.logs = []

    def _start(self, *argv: str) -> subprocess.Popen:
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "ab")
        self.logs.append(log)
        process = subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1",
                                    "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", *argv],
                                   env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(process)
        return process

    def start_head(self, timeout_s: float = 120) -> "RayCluster":
        self._start("--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard", "false",
                    "--temp-dir", str(self.temp_dir))
        self._wait_started(0, timeout_s)
        return self

    def _wait_started(self, index: int, timeout_s: float) -> None:
        log = self.temp_dir / f"node{index}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"ray node {index} did not start in {timeout_s} s:\n{self.log_text()}")

    def add_worker(self, timeout_s: float = 120) -> subprocess.Popen:
        """A node with one huabi slot (what `ray start --resources '{"huabi_slot": 1}'` gives a CPU machine)."""
        process = self._start("--address", self.address, "--num-cpus", "1", "--resources", '{"huabi_slot": 1}')
        self._wait_started(len(self.nodes) - 1, timeout_s)
        return process

    def wait_for_slots(self, count: int, timeout_s: float = 120) -> None:
        script = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
                  "print(int(ray.cluster_resources().get('huabi_slot', 0)))")
        deadline = time.monotonic() + timeout_s
        seen = ""
        while time.monotonic() < deadline:
            self.check_alive()
            run = subprocess.run([sys.executable, "-c", script, self.address], env=self.env, capture_output=True,
                                 text=True, timeout=120)
            seen = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
            if seen.isdigit() and int(seen) >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster has not {count} huabi slots after {timeout_s} s: {seen}\n{self.log_text()}")

    def check_alive(self) -> None:
        for process in self.nodes:
            if process.poll() is not None:
                raise RuntimeError(f"a ray node exited with {process.returncode}:\n{self.log_text()}")

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted(self.temp_dir.glob("node*.log")))

    def stop(self) -> None:
        """SIGKILL every process of the nodes' sessions (raylets, GCS, workers): nothing outlives the tests."""
        for process in self.nodes:
            for pid in session_pids(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(pid) for p in self.nodes for pid in session_pids(p.pid)):
            time.sleep(0.2)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def session_pids(session_id: int) -> list[int]:
    """Processes whose session is ``session_id`` (the node's ``ray start``, and all it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # stat: state ppid pgrp session ...
            pids.append(int(entry.name))
    return pids
