"""The gallery: every image huabi makes, recorded in one SQLite database under the data dir.

``huabi serve`` keeps its job queue in the same database file (``DATA_DIR/huabi.sqlite3``) and
shows this table as its gallery; the CLI records the images it writes here too, as it writes
them, so the web UI lists what ``huabi generate``/``huabi edit`` made.

Which data dir: ``$HUABI_DATA_DIR``, else ``$HUABI_HOME/server``, else ``~/huabi/server`` -- the
folder ``huabi serve`` uses when no ``--data-dir`` is given. The CLI records only into a gallery
that exists (a server has used that data dir once), so a command-line-only user gets no database
they never asked for; ``HUABI_DATA_DIR=off`` (or ``none``) turns CLI recording off.

Durability: WAL journal with ``synchronous=FULL``; several processes (a server and CLI runs) may
write at once, SQLite serialises them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from huabi.errors import HuabiError

log = logging.getLogger(__name__)

DATABASE_NAME = "huabi.sqlite3"
THUMBNAIL_PX = 256
_OFF = ("off", "none", "0", "no", "false")

SCHEMA = """
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


def default_data_dir() -> Path:
    """``$HUABI_DATA_DIR``, else ``$HUABI_HOME/server``, else ``~/huabi/server`` (``huabi serve``'s default)."""
    chosen = os.environ.get("HUABI_DATA_DIR")
    if chosen and chosen.strip().lower() not in _OFF:
        return Path(chosen).expanduser()
    home = os.environ.get("HUABI_HOME")
    return (Path(home) if home else Path.home() / "huabi") / "server"


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


class Gallery:
    """The ``images`` table of ``path`` (a database under a data dir; thumbnails go beside it).

    One connection guarded by a lock: a few rows per image, far below what SQLite serialises comfortably.
    """

    def __init__(self, path: Path, *, extra_schema: str = "") -> None:
        self.path = Path(path)
        self.data_dir = self.path.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA + extra_schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- rows ---------------------------------------------------------------------------

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

    # -- image files --------------------------------------------------------------------

    def record(self, path: Path, infotext: str, *, job_id: str | None = None) -> int:
        """Put one image file into the gallery (parameters from ``infotext``, a thumbnail); its gallery id."""
        from PIL import Image

        from huabi.core.infotext import parse_infotext
        from huabi.models.files import atomic_path

        path = Path(path)
        parsed = parse_infotext(infotext)
        params = parsed.params
        width = height = None
        if "Size" in params and "x" in params["Size"]:
            w, _, h = params["Size"].partition("x")
            width, height = (int(w), int(h)) if w.isdigit() and h.isdigit() else (None, None)
        seed = int(params["Seed"]) if params.get("Seed", "").isdigit() else None
        thumb_name = None
        try:
            with Image.open(path) as image:
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                thumb_path = self.data_dir / "thumbnails" / f"{uuid.uuid4().hex[:12]}-{path.stem}.webp"
                with atomic_path(thumb_path) as temp:
                    image.convert("RGB").save(temp, format="WEBP", quality=85)
                thumb_name = str(thumb_path.relative_to(self.data_dir))
        except OSError as err:
            log.warning("no thumbnail for %s: %s", path, err)
        try:
            stored_path = str(path.resolve().relative_to(self.data_dir.resolve()))
        except ValueError:
            stored_path = str(path.resolve())
        return self.add_image(job_id=job_id, path=stored_path, thumbnail=thumb_name, prompt=parsed.prompt,
                              negative_prompt=parsed.negative_prompt, seed=seed, model=params.get("Model"),
                              sampler=params.get("Sampler"), width=width, height=height, infotext=infotext)

    def scan(self, folders: Iterable[Path]) -> int:
        """Record the PNGs with infotext in ``folders`` that the gallery lacks; how many were added."""
        from huabi.service.pngio import read_infotext

        added = 0
        for folder in folders:
            for path in sorted(Path(folder).rglob("*.png")):
                if path.name.startswith(".") or self.has_image_path(str(path.resolve())):
                    continue
                try:
                    infotext = read_infotext(path)
                except HuabiError:
                    continue  # not a generated image (no parameters) or unreadable
                self.record(path, infotext)
                added += 1
        return added


def existing_gallery(data_dir: Path | None = None) -> Gallery | None:
    """The gallery of ``data_dir`` (default :func:`default_data_dir`) if its database exists, else None
    (also when ``$HUABI_DATA_DIR`` is ``off``)."""
    if data_dir is None:
        if os.environ.get("HUABI_DATA_DIR", "").strip().lower() in _OFF:
            return None
        data_dir = default_data_dir()
    database = Path(data_dir) / DATABASE_NAME
    if not database.is_file():
        return None
    return Gallery(database)


class GalleryRecorder:
    """An ``on_saved`` callback that records each written image into an existing gallery.

    A gallery that cannot be written (locked, read-only, corrupt) costs a warning, never the image:
    the PNG is already on disk when this runs.
    """

    def __init__(self, gallery: Gallery | None) -> None:
        self.gallery = gallery
        self.warned = False

    def __call__(self, result) -> None:
        if self.gallery is None or getattr(result, "path", None) is None:
            return
        try:
            self.gallery.record(Path(result.path), result.infotext)
        except (sqlite3.Error, OSError, HuabiError) as err:
            if not self.warned:
                log.warning("gallery %s: not recorded (%s)", self.gallery.path, err)
                self.warned = True

    def close(self) -> None:
        if self.gallery is not None:
            self.gallery.close()


def _image(row: sqlite3.Row) -> GalleryImage:
    return GalleryImage(id=row["id"], job_id=row["job_id"], path=row["path"], thumbnail=row["thumbnail"],
                        prompt=row["prompt"], negative_prompt=row["negative_prompt"], seed=row["seed"],
                        model=row["model"], sampler=row["sampler"], width=row["width"], height=row["height"],
                        created=row["created"], infotext=row["infotext"], favourite=bool(row["favourite"]))
