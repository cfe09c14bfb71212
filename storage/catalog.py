"""The DuckDB catalog: which images and captions make up each dataset split, and what was downloaded.

Tables
  images    (dataset, image_id, split, path, width, height, domain, status, reason)
  captions  (dataset, image_id, caption_id, text, split)   -- NoCaps val and test reuse image ids
  downloads (name, url, bytes, checksum, verified_at, dataset)
  builds    (dataset, built_at, images, usable, captions, excluded, synthetic)
status is "ok" for usable images; see pipeline/image_check.py for the others. domain is a NoCaps
image's domain where its files name one (val, in the images of its captions file), else null.
synthetic is true for a dataset whose files are the synthetic corpus in its format (their manifest
or annotation files say so), not the dataset itself.

answer_query runs a user's SQL (`ituning catalog query`) on a connection that can only read the
catalog: the file is opened read-only, DuckDB may touch no other file and no network (no COPY,
ATTACH, read_csv/read_text, extension install or load) and its settings are locked, and only
SELECT-style statements (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, PRAGMA table_info, EXPLAIN)
are run.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from storage.catalog_lock import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (dataset TEXT NOT NULL, image_id TEXT NOT NULL, split TEXT NOT NULL,
    path TEXT NOT NULL, width INTEGER, height INTEGER, domain TEXT, status TEXT NOT NULL, reason TEXT,
    PRIMARY KEY (dataset, split, image_id));
CREATE TABLE IF NOT EXISTS captions (dataset TEXT NOT NULL, image_id TEXT NOT NULL, caption_id BIGINT NOT NULL,
    text TEXT NOT NULL, split TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS downloads (name TEXT NOT NULL, url TEXT NOT NULL, bytes BIGINT, checksum TEXT,
    verified_at TIMESTAMPTZ, dataset TEXT NOT NULL, PRIMARY KEY (dataset, name));
CREATE TABLE IF NOT EXISTS builds (dataset TEXT PRIMARY KEY, built_at TIMESTAMPTZ, images BIGINT,
    usable BIGINT, captions BIGINT, excluded BIGINT, synthetic BOOLEAN DEFAULT false);
ALTER TABLE builds ADD COLUMN IF NOT EXISTS synthetic BOOLEAN DEFAULT false;
"""
USABLE_IMAGES = "FROM images WHERE dataset = ? AND split = ? AND status = 'ok'"
USABLE_CAPTIONS = ("FROM captions c JOIN images i USING (dataset, split, image_id) "
                   "WHERE c.dataset = ? AND c.split = ? AND i.status = 'ok'")
IMAGE_COLUMNS = ("dataset", "image_id", "split", "path", "width", "height", "domain", "status", "reason")
CAPTION_COLUMNS = ("dataset", "image_id", "caption_id", "text", "split")
# DuckDB settings of a query connection; lock_configuration keeps a query from SETting them back.
QUERY_SETTINGS = {"enable_external_access": False, "autoinstall_known_extensions": False,
                  "autoload_known_extensions": False, "allow_community_extensions": False,
                  "allow_unsigned_extensions": False, "lock_configuration": True}
QUERY_STATEMENTS = ("SELECT", "EXPLAIN")  # DESCRIBE, SHOW, SUMMARIZE and PRAGMA table_info parse as SELECT


class QueryRefused(ValueError):
    """A catalog query that is not one read-only statement."""


@dataclass(frozen=True)
class CatalogImage:
    dataset: str
    image_id: str
    split: str
    path: Path
    width: int | None
    height: int | None
    domain: str | None


class Catalog:
    """One catalog file; open read_only=True to query while nothing writes."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = connect(self.path, read_only=read_only)  # CatalogBusy while another process holds it
        if not read_only:
            self.connection.execute(SCHEMA)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def usable_images(self, dataset: str, split: str) -> list[CatalogImage]:
        rows = self.connection.execute(
            f"SELECT dataset, image_id, split, path, width, height, domain {USABLE_IMAGES} ORDER BY image_id",
            [dataset, split]).fetchall()
        return [CatalogImage(d, i, s, self.path.parent / p, w, h, dom) for d, i, s, p, w, h, dom in rows]

    def image_paths(self, dataset: str, split: str) -> list[tuple[str, Path]]:
        """The split's usable images as (image_id, path), sorted by image id; a relative path is
        taken from the catalog's folder, the workspace."""
        return [(image.image_id, image.path) for image in self.usable_images(dataset, split)]

    def captions(self, dataset: str, split: str) -> dict[str, list[str]]:
        """Captions of the split's usable images (for VG, its region phrases), in caption_id order."""
        rows = self.connection.execute(
            f"SELECT c.image_id, c.text {USABLE_CAPTIONS} ORDER BY c.image_id, c.caption_id",
            [dataset, split]).fetchall()
        result: dict[str, list[str]] = {}
        for image_id, text in rows:
            result.setdefault(image_id, []).append(text)
        return result

    def image_list_fingerprint(self, dataset: str, split: str) -> str:
        """storage.image_lists.image_list_fingerprint of the usable images, the digest the feature
        cache records; a relative path is taken from the catalog's folder, the workspace."""
        from storage.image_lists import image_list_fingerprint

        rows = self.connection.execute(f"SELECT image_id, path {USABLE_IMAGES}", [dataset, split]).fetchall()
        return image_list_fingerprint(rows, base=self.path.parent, root=self.path.parent)

    def captions_fingerprint(self, dataset: str, split: str) -> str:
        """sha256 over the usable images' "image_id<TAB>caption" lines in caption order."""
        return self._sha256("c.image_id || chr(9) || c.text", "c.image_id, c.caption_id", USABLE_CAPTIONS,
                            [dataset, split])

    def split_fingerprint(self, dataset: str, split: str) -> str:
        """What training or evaluation reads of a split: its usable images and their captions."""
        parts = f"{self.image_list_fingerprint(dataset, split)}|{self.captions_fingerprint(dataset, split)}"
        return hashlib.sha256(parts.encode()).hexdigest()

    def _sha256(self, line: str, order: str, source: str, parameters: list) -> str:
        query = f"SELECT sha256(coalesce(string_agg({line} || chr(10), '' ORDER BY {order}), '')) {source}"
        return self.connection.execute(query, parameters).fetchone()[0]

    def is_synthetic(self, dataset: str) -> bool:
        """Whether the catalogued `dataset` is the synthetic corpus in its format (false for a catalog
        built before this was recorded)."""
        columns = {row[0] for row in self.connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'builds'").fetchall()}
        if "synthetic" not in columns:
            return False
        row = self.connection.execute("SELECT synthetic FROM builds WHERE dataset = ?", [dataset]).fetchone()
        return bool(row and row[0])

    def query(self, sql: str, parameters: list | None = None) -> tuple[list[str], list[tuple]]:
        result = self.connection.execute(sql, parameters) if parameters else self.connection.execute(sql)
        columns = [column[0] for column in result.description or []]
        return columns, result.fetchall()

    def replace_dataset(self, dataset: str, images: dict[str, list], captions: dict[str, list], excluded: int,
                        synthetic: bool = False) -> None:
        """Swap in a dataset's rows (columns given as lists) in one transaction; `synthetic`: they are
        the synthetic corpus in the dataset's format."""
        image_table = pa.table({"dataset": [dataset] * len(images["image_id"]), **images}).select(IMAGE_COLUMNS)
        caption_table = pa.table({"dataset": [dataset] * len(captions["image_id"]), **captions}).select(CAPTION_COLUMNS)
        con = self.connection
        con.execute("BEGIN TRANSACTION")
        try:
            for table in ("images", "captions", "builds"):
                con.execute(f"DELETE FROM {table} WHERE dataset = ?", [dataset])
            con.register("new_images", image_table)
            con.register("new_captions", caption_table)
            con.execute(f"INSERT INTO images ({', '.join(IMAGE_COLUMNS)}) SELECT * FROM new_images")
            con.execute(f"INSERT INTO captions ({', '.join(CAPTION_COLUMNS)}) SELECT * FROM new_captions")
            con.execute("INSERT INTO builds SELECT ?, ?, count(*), count(*) FILTER (status = 'ok'), ?, ?, ? "
                        "FROM images WHERE dataset = ?",
                        [dataset, datetime.now(timezone.utc), len(caption_table), excluded, synthetic, dataset])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("new_images")
            con.unregister("new_captions")

    def record_downloads(self, dataset: str, records) -> None:
        """Upsert verified files (objects with name, url, bytes, checksum, verified_at)."""
        if not records:
            return
        self.connection.executemany(
            "INSERT OR REPLACE INTO downloads VALUES (?, ?, ?, ?, ?, ?)",
            [[r.name, r.url, r.bytes, r.checksum, r.verified_at, dataset] for r in records])


def answer_query(path: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Column names and rows of one read-only statement on the catalog at `path` (see the module
    docstring). Raises QueryRefused for other statements, duckdb.Error for failing ones."""
    connection = connect(path, read_only=True, **QUERY_SETTINGS)  # CatalogBusy while a build holds it
    try:
        statements = connection.extract_statements(sql)
        if len(statements) != 1:
            raise QueryRefused(f"give exactly one SQL statement, not {len(statements)}")
        kind = statements[0].type.name
        if kind not in QUERY_STATEMENTS:
            raise QueryRefused(f"the catalog query is read-only: {kind} statements are not run; "
                               f"use SELECT (or WITH, DESCRIBE, SHOW, EXPLAIN)")
        result = connection.execute(sql)
        return [column[0] for column in result.description or []], result.fetchall()
    finally:
        connection.close()
