"""A captioned collection on disk: one Parquet file per shard, written whole or not at all, and its summary.

    OUT/collection.json        what was captioned and how: source, its fingerprint, shards, settings and
                               their digest; a run with other settings or another source refuses OUT
    OUT/shard-00000.parquet    one row per image (ROW_SCHEMA); the settings digest in the file's metadata
    OUT/summary.json           counts per status, images/s of the last run, the CLIP-S histogram

A shard is written to a temporary name beside its final one, flushed, then renamed: a killed run
leaves whole shards and temporary files (removed by the next run), never half a shard. DuckDB reads
the shards as one table: `SELECT status, count(*) FROM 'OUT/*.parquet' GROUP BY status`.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import sync_folder, write_atomically

STATUSES = ("ok", "unreadable", "missing", "too-large", "fetch-failed")
MANIFEST, SUMMARY = "collection.json", "summary.json"
DIGEST_KEY = b"ituning.settings_digest"
CLIP_S_EDGES = [round(0.1 * step, 1) for step in range(11)] + [float("inf")]  # CLIP-S is w·cos, w = 2.5

BEAM = pa.struct([("caption", pa.string()), ("score", pa.float64()), ("clip_s", pa.float64())])
ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("caption", pa.string()), ("score", pa.float64()), ("clip_s", pa.float64()),
    ("beams", pa.list_(BEAM)),  # every finished beam, best by score first; `caption` is the chosen one
    ("width", pa.int32()), ("height", pa.int32()), ("given_caption", pa.string()),
    ("shard", pa.string()), ("model", pa.string()), ("settings_digest", pa.string()),
])


class CollectionMismatch(ValueError):
    """An output folder that holds another collection, or the same one captioned with other settings."""


@dataclass
class Row:
    key: str
    source: str
    status: str = "ok"
    reason: str | None = None
    caption: str | None = None
    score: float | None = None
    clip_s: float | None = None
    beams: list[dict] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    given_caption: str | None = None


def shard_path(out: Path, shard_name: str) -> Path:
    return Path(out) / f"{shard_name}.parquet"


def write_shard(out: Path, shard_name: str, rows: list[Row], model: str, digest: str) -> Path:
    """The shard's rows as one Parquet file, atomically (see the module docstring)."""
    records = [{**asdict(row), "shard": shard_name, "model": model, "settings_digest": digest} for row in rows]
    table = pa.Table.from_pylist(records, schema=ROW_SCHEMA).replace_schema_metadata({DIGEST_KEY: digest})
    path = shard_path(out, shard_name)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_folder(path.parent)
    return path


def finished_shard(out: Path, shard_name: str, digest: str) -> int | None:
    """The number of rows of a shard written with these settings, or None when it is not (yet) there."""
    path = shard_path(out, shard_name)
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid):  # absent, or damaged since: written again
        return None
    if (metadata.metadata or {}).get(DIGEST_KEY, b"").decode() != digest:
        raise CollectionMismatch(f"{path} was written with other settings; give another --out")
    return metadata.num_rows


def remove_temporary_files(out: Path) -> None:
    """What a killed run left half-written."""
    for leftover in Path(out).glob("*.parquet.tmp-*"):
        leftover.unlink(missing_ok=True)


def claim_output(out: Path, manifest: dict) -> None:
    """Record in `out` what is captioned there; CollectionMismatch when it already holds another
    source or other settings (so that its shards are never a mix)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.is_file():
        held = json.loads(path.read_text())
        for field_name, what in (("fingerprint", "another source (or the source has changed)"),
                                 ("settings_digest", "captions made with other settings")):
            if held.get(field_name) != manifest[field_name]:
                raise CollectionMismatch(
                    f"{out} holds {what}: {held.get('source')} with {json.dumps(held.get('settings'))}; "
                    "give another --out")
    write_atomically(path, json.dumps(manifest, indent=2) + "\n", durable=True)


def summarize(out: Path, run: dict) -> dict:
    """Counts per status, the CLIP-S histogram and mean over every shard in `out`, and `run` (this run's
    images, seconds, images/s, shards written and reused); written to OUT/summary.json."""
    files = sorted(Path(out).glob("shard-*.parquet"))
    table = pa.concat_tables([pq.read_table(path, columns=["status", "clip_s"]) for path in files]) if files else None
    statuses = table.column("status").to_pylist() if table is not None else []
    scores = [value for value in (table.column("clip_s").to_pylist() if table is not None else []) if value is not None]
    counts, _ = np.histogram(scores, bins=CLIP_S_EDGES)
    summary = {
        "images": len(statuses), "shards": len(files),
        "statuses": {status: statuses.count(status) for status in STATUSES},
        "clip_s": {"images": len(scores), "mean": float(np.mean(scores)) if scores else None,
                   "histogram": [{"from": low, "to": None if high == float("inf") else high, "images": int(count)}
                                 for low, high, count in zip(CLIP_S_EDGES, CLIP_S_EDGES[1:], counts)]},
        "run": run,
    }
    write_atomically(Path(out) / SUMMARY, json.dumps(summary, indent=2) + "\n", durable=True)
    return summary
