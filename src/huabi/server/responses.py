"""Small pieces every route module shares: the JSON error shape and where the web UI's files are.

Kept apart from app.py so route modules need not import the application module that imports them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi.responses import JSONResponse


def type_for(status: int) -> str:
    return {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge",
            422: "UnprocessableEntity", 500: "InternalError", 503: "ServiceUnavailable"}.get(status, "Error")


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": type_for(status), "detail": message, "errors": message}, status_code=status,
                        headers=headers or None)


def webui_dir() -> Path:
    return Path(str(resources.files("huabi") / "server" / "webui"))
