"""A real `huabi serve` in a child process on 127.0.0.1 (a free port), for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, models_dir: Path, *extra: str, auth: tuple[str, str] | None = None) -> None:
        self.data_dir, self.models_dir, self.extra, self.auth = data_dir, models_dir, extra, auth
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        env["HF_HUB_OFFLINE"] = "1"
        command = [sys.executable, "-m", "huabi.cli.main", "serve", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), "--models-dir", str(self.models_dir), "--device", "cpu",
                   *self.extra]
        if self.auth:
            command += ["--api-auth", f"{self.auth[0]}:{self.auth[1]}"]
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                requests.get(f"{self.url}/sdapi/v1/progress", auth=self.auth, timeout=2)
                return self
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if hasattr(self, "log"):
            self.log.close()

    # -- helpers ------------------------------------------------------------------------

    def get(self, path: str, **kwargs):
        kwargs.setdefault("auth", self.auth)
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def post(self, path: str, json=None, **kwargs):
        kwargs.setdefault("auth", self.auth)
        return requests.post(self.url + path, json=json, timeout=kwargs.pop("timeout", 300), **kwargs)

    def delete(self, path: str, **kwargs):
        kwargs.setdefault("auth", self.auth)
        return requests.delete(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def wait_job(self, job_id: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get(f"/huabi/v1/jobs/{job_id}", params={"wait": 5}).json()
            if job["status"] in ("done", "failed", "cancelled", "interrupted"):
                return job
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")

    def wait_running(self, job_id: str | None = None, min_step: int = 1, timeout_s: float = 120) -> dict:
        """Poll /progress until a job (or ``job_id``) has made ``min_step`` steps."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            progress = self.get("/sdapi/v1/progress").json()
            running = progress["current_task"]
            if running and (job_id is None or running == job_id) and progress["state"]["sampling_step"] >= min_step:
                return progress
            time.sleep(0.05)
        raise AssertionError("no job started running")
