"""Reading fields of raw JSON with errors that name the file and the field."""

from pathlib import Path

import orjson  # several times faster than json on the 100+ MiB annotation files


class MalformedInput(ValueError):
    """A JSON file without a field the pipeline needs, or with one of the wrong type."""


def load_json(path: Path):
    try:
        return orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as error:
        raise MalformedInput(f"{path}: not valid JSON ({error})") from error


def required(entry, key: str, kind, source: Path, where: str = "", error=MalformedInput):
    """entry[key], checked to be of `kind` (a type or tuple of types)."""
    label = f"{where}.{key}" if where else key
    if not isinstance(entry, dict) or key not in entry:
        raise error(f"{source}: missing field {label}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise error(f"{source}: field {label} must be {names}, not {type(value).__name__}")
    return value


def one_of(entry, key: str, choices, source: Path, where: str = "") -> str:
    """entry[key], a string that must be one of `choices`."""
    value = required(entry, key, str, source, where)
    if value not in choices:
        label = f"{where}.{key}" if where else key
        raise MalformedInput(f"{source}: field {label} is {value!r}; expected one of {', '.join(choices)}")
    return value


INT32 = (-(2**31), 2**31 - 1)  # an INTEGER column of the catalog
INT64 = (-(2**63), 2**63 - 1)  # a BIGINT column


def integer(entry, key: str, source: Path, where: str = "", bounds: tuple[int, int] = INT64,
            optional: bool = False) -> int | None:
    """entry[key], an integer within `bounds`; with `optional`, None where the field is absent or null."""
    if optional and (not isinstance(entry, dict) or entry.get(key) is None):
        return None
    value = required(entry, key, int, source, where)
    if not bounds[0] <= value <= bounds[1]:
        label = f"{where}.{key}" if where else key
        raise MalformedInput(f"{source}: field {label} is {value}; expected an integer from {bounds[0]} to {bounds[1]}")
    return value


def inside_path(value: str, source: Path, label: str) -> str:
    """`value` (from field `label`), checked to be a relative path that stays inside the folder it is
    taken from: no absolute path, drive letter, `..` or NUL byte (string tests: this runs per image)."""
    slashed = value.replace("\\", "/")
    if slashed.startswith("/") or value[1:2] == ":" or ".." in slashed.split("/") or "\0" in value:
        raise MalformedInput(f"{source}: field {label} is {value!r}; expected a path inside the data folder")
    return value
