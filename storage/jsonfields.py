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
