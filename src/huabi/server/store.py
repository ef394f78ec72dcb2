"""The server's SQLite database under --data-dir: the job queue, beside the gallery's table.

The gallery (:mod:`huabi.service.gallery`) lives in the service layer so that the CLI records the
images it writes into the same database. Durability: WAL journal with ``synchronous=FULL``, so a
job row is on disk when ``add_job`` returns and only then is the job acknowledged to the client.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from huabi.service.gallery import Gallery, GalleryImage  # noqa: F401 -- GalleryImage: importable from here, as before

JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    options TEXT NOT NULL,
    source TEXT NOT NULL,
    meta TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, priority, seq);
"""

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = "queued", "running", "done", "failed", "cancelled", "interrupted"
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    kind: str
    options: dict
    source: str
    meta: dict
    priority: int
    status: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    images: list[int]
    worker: str | None = None  # where it ran (scale-out: the Ray worker); None for this process

    def public(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "priority": self.priority,
                "source": self.source, "options": self.options, "created": self.created, "started": self.started,
                "finished": self.finished, "error": self.error, "images": self.images, "worker": self.worker}


def new_job_id() -> str:
    return uuid.uuid4().hex


class Store(Gallery):
    """The gallery's database with the job queue's table added."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, extra_schema=JOBS_SCHEMA)
        columns = {row[1] for row in self._query("PRAGMA table_info(jobs)")}
        if "worker" not in columns:  # a database made before scale-out (issue 21)
            self._execute("ALTER TABLE jobs ADD COLUMN worker TEXT")

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, job_id: str, kind: str, options: dict, *, source: str, meta: dict, priority: int = 0) -> None:
        self._execute(
            "INSERT INTO jobs (id, kind, options, source, meta, priority, status, created) VALUES (?,?,?,?,?,?,?,?)",
            (job_id, kind, json.dumps(options), source, json.dumps(meta), int(priority), QUEUED, time.time()),
        )

    def job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, statuses: tuple[str, ...] | None = None, limit: int = 200) -> list[Job]:
        if statuses:
            marks = ",".join("?" * len(statuses))
            rows = self._query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq DESC LIMIT ?",
                               (*statuses, limit))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        return [_job(row) for row in rows]

    def count_queued(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,))[0][0])

    def claim_next(self) -> Job | None:
        """The next queued job (highest priority, then oldest), marked running."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY priority DESC, seq ASC LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ?", (RUNNING, time.time(), row["id"]))
        return self.job(row["id"])

    def finish_job(self, job_id: str, status: str, *, error: str | None = None, images: list[int] = ()) -> None:
        self._execute("UPDATE jobs SET status = ?, finished = ?, error = ?, images = ? WHERE id = ?",
                      (status, time.time(), error, json.dumps(list(images)), job_id))

    def set_worker(self, job_id: str, worker: str) -> None:
        self._execute("UPDATE jobs SET worker = ? WHERE id = ?", (worker, job_id))

    def cancel_queued(self, job_id: str) -> bool:
        cursor = self._execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ? AND status = ?",
                               (CANCELLED, time.time(), "cancelled before it started", job_id, QUEUED))
        return cursor.rowcount == 1

    def fail_interrupted_runs(self) -> list[str]:
        """Crash recovery: a job left 'running' by a dead server is reported failed."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
            self._db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE status = ?",
                             (FAILED, time.time(), "the server stopped while this job ran; submit it again", RUNNING))
        return [row["id"] for row in rows]


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], seq=row["seq"], kind=row["kind"], options=json.loads(row["options"]),
               source=row["source"], meta=json.loads(row["meta"]), priority=row["priority"], status=row["status"],
               created=row["created"], started=row["started"], finished=row["finished"], error=row["error"],
               images=json.loads(row["images"]), worker=row["worker"])
