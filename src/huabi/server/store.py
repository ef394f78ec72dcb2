"""The server's SQLite database under --data-dir: the job queue and the gallery.

Durability: WAL journal with ``synchronous=FULL``, so a job row is on disk when
``add_job`` returns and only then is the job acknowledged to the client. One
connection guarded by a lock: the server writes a few rows per image, far
below what SQLite serialises comfortably.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    path TEXT UNIQUE NOT NULL,
    thumbnail TEXT,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER,
    model TEXT,
    sampler TEXT,
    width INTEGER,
    height INTEGER,
    created REAL NOT NULL,
    infotext TEXT NOT NULL,
    favourite INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS images_created ON images(created);
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


@dataclass(frozen=True)
class GalleryImage:
    id: int
    job_id: str | None
    path: str
    thumbnail: str | None
    prompt: str
    negative_prompt: str
    seed: int | None
    model: str | None
    sampler: str | None
    width: int | None
    height: int | None
    created: float
    infotext: str
    favourite: bool

    def public(self) -> dict:
        return {"id": self.id, "job_id": self.job_id, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "seed": self.seed, "model": self.model, "sampler": self.sampler, "width": self.width,
                "height": self.height, "created": self.created, "infotext": self.infotext,
                "favourite": self.favourite, "url": f"/huabi/v1/gallery/{self.id}/image",
                "thumbnail_url": f"/huabi/v1/gallery/{self.id}/thumbnail"}


def new_job_id() -> str:
    return uuid.uuid4().hex


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "worker" not in columns:  # a database made before scale-out (issue 21)
                self._db.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

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

    # -- gallery ------------------------------------------------------------------------

    def add_image(self, *, job_id: str | None, path: str, thumbnail: str | None, prompt: str, negative_prompt: str,
                  seed: int | None, model: str | None, sampler: str | None, width: int | None, height: int | None,
                  infotext: str) -> int:
        cursor = self._execute(
            "INSERT OR IGNORE INTO images (job_id, path, thumbnail, prompt, negative_prompt, seed, model, sampler, "
            "width, height, created, infotext) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (job_id, path, thumbnail, prompt, negative_prompt, seed, model, sampler, width, height, time.time(),
             infotext),
        )
        if cursor.rowcount == 1:
            return int(cursor.lastrowid)
        return int(self._query("SELECT id FROM images WHERE path = ?", (path,))[0][0])

    def has_image_path(self, path: str) -> bool:
        return bool(self._query("SELECT 1 FROM images WHERE path = ?", (path,)))

    def image(self, image_id: int) -> GalleryImage | None:
        rows = self._query("SELECT * FROM images WHERE id = ?", (image_id,))
        return _image(rows[0]) if rows else None

    def search_images(self, *, text: str | None = None, seed: int | None = None, model: str | None = None,
                      sampler: str | None = None, favourite: bool | None = None, limit: int = 100,
                      offset: int = 0) -> list[GalleryImage]:
        where, params = [], []
        if text:
            where.append("(prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\')")
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params += [pattern, pattern]
        for column, value in (("seed", seed), ("model", model), ("sampler", sampler)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if favourite is not None:
            where.append("favourite = ?")
            params.append(int(favourite))
        sql = "SELECT * FROM images" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        return [_image(row) for row in self._query(sql, (*params, int(limit), int(offset)))]

    def set_favourite(self, image_id: int, favourite: bool) -> bool:
        return self._execute("UPDATE images SET favourite = ? WHERE id = ?", (int(favourite), image_id)).rowcount == 1

    def delete_image(self, image_id: int) -> bool:
        return self._execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount == 1


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], seq=row["seq"], kind=row["kind"], options=json.loads(row["options"]),
               source=row["source"], meta=json.loads(row["meta"]), priority=row["priority"], status=row["status"],
               created=row["created"], started=row["started"], finished=row["finished"], error=row["error"],
               images=json.loads(row["images"]), worker=row["worker"])


def _image(row: sqlite3.Row) -> GalleryImage:
    return GalleryImage(id=row["id"], job_id=row["job_id"], path=row["path"], thumbnail=row["thumbnail"],
                        prompt=row["prompt"], negative_prompt=row["negative_prompt"], seed=row["seed"],
                        model=row["model"], sampler=row["sampler"], width=row["width"], height=row["height"],
                        created=row["created"], infotext=row["infotext"], favourite=bool(row["favourite"]))
