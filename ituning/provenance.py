"""Where a checkpoint's weights come from, and the terms they are shared under.

Training records it in the checkpoint (adapter_config.json, "provenance"), so that whatever is made
from the checkpoint later (a model card, a pushed repository), in whatever process, can tell:

    data                the splits that trained the modules, this stage's and those of the
                        checkpoint it started from, each marked synthetic when the catalog (or the
                        corpus's own files) said it is the synthetic corpus in that dataset's format
    standin_backbones   the frozen backbones are stand-ins trained in a workspace, not CLIP and GPT-2
    license             the module weights' licence, a hub licence id (the run config's `license`)

A checkpoint written before this was recorded has no "provenance": nothing is known, nothing claimed.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from ituning.backbones import LOCAL_DIR

DEFAULT_LICENSE = "apache-2.0"  # the project's own (pyproject.toml), so the modules' by default
# A hub licence id: lowercase letters, digits, '.', '-' and '+' (apache-2.0, mit, cc-by-4.0, other ...).
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
STANDIN_MARKER = "ituning-standin.json"  # in a stand-in backbone's folder (ituning/standins.py)


@dataclass(frozen=True)
class TrainingSplit:
    dataset: str  # a dataset name: coco, vg ...
    split: str
    synthetic: bool = False


@dataclass(frozen=True)
class Provenance:
    data: tuple[TrainingSplit, ...] = ()
    standin_backbones: bool = False
    license: str = DEFAULT_LICENSE

    @property
    def synthetic_data(self) -> bool:
        return any(split.synthetic for split in self.data)

    def to_dict(self) -> dict:
        return {"data": [vars(split) for split in self.data], "standin_backbones": self.standin_backbones,
                "license": self.license}

    @classmethod
    def from_dict(cls, record: dict) -> "Provenance":
        data = tuple(TrainingSplit(item["dataset"], item["split"], bool(item.get("synthetic")))
                     for item in record.get("data", []))
        return cls(data, bool(record.get("standin_backbones")), record.get("license") or DEFAULT_LICENSE)

    def after(self, earlier: "Provenance | None") -> "Provenance":
        """This stage's provenance on top of the checkpoint it started from: both stages' data."""
        if earlier is None:
            return self
        data = tuple(dict.fromkeys(earlier.data + self.data))
        return Provenance(data, self.standin_backbones or earlier.standin_backbones, self.license)


def is_license_id(text: str) -> bool:
    return LICENSE_ID.fullmatch(text) is not None


def provenance_of(config: dict) -> Provenance | None:
    """The provenance an adapter_config.json records; None when it records none."""
    record = config.get("provenance")
    return Provenance.from_dict(record) if isinstance(record, dict) else None


def is_standin_backbone(name: str | None) -> bool:
    """Whether a backbone named by a local folder (`local-dir:PATH` or PATH) is a stand-in that
    ituning/standins.py made: its folder holds the stand-in marker."""
    if not name:
        return False
    folder = Path(name.removeprefix(LOCAL_DIR)).expanduser()
    return (folder / STANDIN_MARKER).is_file()
