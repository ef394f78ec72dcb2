"""The HTTP application: A1111's /sdapi/v1 routes, huabi's /huabi/v1 routes and the web UI, one process.

Every route goes through basic auth when --api-auth is set, and every request
body is capped before it is read. Engine work happens only in the queue's worker
(through runner.py); route handlers validate, store and wait.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from PIL import Image

from huabi.errors import HuabiError
from huabi.models.files import atomic_write_bytes as write_atomic
from huabi.server.a1111 import Context, Limits
from huabi.server.catalog import Catalog, UnsafeName
from huabi.server.jobs import JobQueue, LocalExecutor, QueueFull
from huabi.server.responses import error, type_for, webui_dir  # noqa: F401 -- also importable from here
from huabi.server.runner import Runner, RunnerConfig, validate
from huabi.server.store import Store

RETRY_AFTER_S = 10


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    limits: Limits = field(default_factory=Limits)
    credentials: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no auth
    default_model: str | None = None
    gallery_folders: tuple[Path, ...] = ()  # folders of images made elsewhere (the CLI's outputs) to index
    # Scale-out (issue 21, docs/scale-out.md): None runs jobs here; "auto" or HOST:PORT runs them on Ray workers.
    ray: str | None = None
    ray_threads: int | None = None  # torch threads on the workers (default: this machine's, for identical PNGs)
    ray_attempts: int = 3  # runs of a job whose worker dies before it fails


def parse_credentials(text: str) -> tuple[tuple[str, str], ...]:
    """A1111's --api-auth: ``user:pass[,user:pass...]``."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise HuabiError("api-auth: expected USER:PASS[,USER:PASS...]")
        pairs.append((user, password))
    return tuple(pairs)


class _LimitedBodyMiddleware:
    """Refuse bodies over the limit (413) from Content-Length or while they stream in."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _json_error(send, 413, f"body: larger than this server accepts ({self.max_bytes} bytes)")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _json_error(send, 413, f"body: larger than this server accepts ({self.max_bytes} bytes)")


class _BodyTooLarge(Exception):
    pass


class _AuthMiddleware:
    """HTTP basic auth on every route (A1111's --api-auth), compared in constant time."""

    def __init__(self, app, credentials: tuple[tuple[str, str], ...]) -> None:
        self.app = app
        self.accepted = [f"{user}:{password}".encode() for user, password in credentials]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.accepted:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = b""
        if header[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(header[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
        if not any(hmac.compare_digest(given, ok) for ok in self.accepted):
            return await _json_error(send, 401, "auth: wrong or missing credentials",
                                     extra_headers=[(b"www-authenticate", b'Basic realm="huabi"')])
        return await self.app(scope, receive, send)


async def _json_error(send, status: int, message: str, extra_headers=()) -> None:
    body = json.dumps({"error": type_for(status), "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class Server:
    """Everything one `huabi serve` process owns."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(config.runner)
        self.catalog = Catalog(config.runner.models_dir or _default_models_dir(), self.runner)
        self.store = Store(self.data_dir / "huabi.sqlite3")
        self.queue = JobQueue(self.store, self._executor(), self.data_dir, max_queued=config.limits.max_queued)
        self.settings = self._load_settings()
        if config.default_model and "sd_model_checkpoint" not in self.settings:
            self.settings["sd_model_checkpoint"] = config.default_model

    def _executor(self):
        if self.config.ray is None:
            return LocalExecutor(self.runner)
        from huabi.server.ray_executor import make_executor  # imports ray: only with --ray

        return make_executor(self.config.ray, self.config.runner, self.catalog.models_dir,
                             threads=self.config.ray_threads, max_attempts=self.config.ray_attempts,
                             on_worker=self.store.set_worker)

    # -- settings (A1111 /options) ------------------------------------------------------

    def _load_settings(self) -> dict:
        path = self.data_dir / "settings.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def save_settings(self) -> None:
        write_atomic(self.data_dir / "settings.json", json.dumps(self.settings, indent=1).encode())

    def context(self, job_id: str) -> Context:
        def save_input(image: Image.Image, role: str) -> str:
            from PIL import ImageOps

            image = ImageOps.exif_transpose(image)  # the orientation the CLI would apply to the file
            if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path = self.data_dir / "inputs" / job_id / f"{role}.png"
            write_atomic(path, buffer.getvalue())
            return str(path)

        return Context(self.catalog, self.config.limits, dict(self.settings), save_input)

    def scan_gallery(self) -> int:
        return self.store.scan(self.config.gallery_folders)

    # -- submitting ---------------------------------------------------------------------

    def submit(self, kind: str, options: dict, *, source: str, meta: dict, priority: int, job_id: str) -> str:
        validate(kind, options, self.config.runner)  # a bad request fails now, not in the queue
        return self.queue.submit(kind, options, source=source, meta=meta, priority=priority, job_id=job_id)


def _default_models_dir() -> Path:
    from huabi.service.engine import default_models_dir

    return default_models_dir()


def create_app(config: ServerConfig) -> FastAPI:
    server = Server(config)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        server.queue.recover()
        server.queue.start()
        if config.gallery_folders:  # indexed in the background: the server answers meanwhile
            threading.Thread(target=server.scan_gallery, name="huabi-gallery-scan", daemon=True).start()
        yield
        server.queue.shutdown()
        pool = getattr(server.queue.executor, "pool", None)  # --ray: the workers this head made
        if pool is not None:
            pool.close()
        server.store.close()

    # No /docs page: FastAPI's Swagger UI loads its scripts from a CDN, and huabi works offline.
    # The machine-readable description stays at /openapi.json.
    app = FastAPI(title="huabi", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(QueueFull)
    async def _full(_request, err):
        return error(503, str(err), **{"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(UnsafeName)
    async def _unsafe(_request, err):
        return error(400, str(err))

    @app.exception_handler(HuabiError)
    async def _huabi(_request, err):
        return error(422, str(err).splitlines()[0] if str(err) else type(err).__name__)

    from huabi.server.routes import add_routes

    add_routes(app, server)
    app.add_middleware(_LimitedBodyMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(_AuthMiddleware, credentials=config.credentials)  # outermost: auth before anything
    return app


def _version() -> str:
    from huabi import __version__

    return __version__
