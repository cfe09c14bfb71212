"""Make torchvision importable on a CPU-only torch paired with a CUDA torchvision build.

The only torchvision on the registry for torch 2.13.0 is a CUDA build. Its compiled operators need
the CUDA libraries, so on a CPU torch `import torchvision` fails with
"operator torchvision::nms does not exist" -- and open_clip, timm and transformers fail with it,
because they import torchvision. Declaring the two operator schemas its Python side registers fake
kernels for lets the pure-Python parts (transforms, models) import and work. torchvision.ops and
torchvision.io stay unusable there; the project decodes images with PIL and needs neither.

Nothing changes where torchvision imports normally: the real import is always tried first.
"""

import sys
from pathlib import Path

import torch

MISSING_OPERATOR = "torchvision::nms does not exist"
OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)

_schema_library = None  # kept alive: dropping the Library object would unregister the schemas
torchvision_was_patched = False


def ensure_torchvision_importable() -> None:
    """Import torchvision, declaring its missing operator schemas only if the import needs them."""
    try:
        import torchvision  # noqa: F401
        return
    except ModuleNotFoundError:
        return  # not installed: nothing imports it
    except RuntimeError as error:
        if MISSING_OPERATOR not in str(error):
            raise
    _forget_partial_import()
    declare_operator_schemas()
    import torchvision  # noqa: F401,F811


def prepare_torchvision_import(package_dir: Path) -> None:
    """Before torchvision's first import (ituning/import_hook.py): declare the operator
    schemas if its compiled operators cannot load, so that the import succeeds the first time."""
    compiled = sorted(Path(package_dir).glob("_C*.so")) + sorted(Path(package_dir).glob("_C*.pyd"))
    if not compiled or _schema_library is not None:
        return
    try:
        torch.ops.load_library(str(compiled[0]))  # what torchvision itself does first
    except OSError:
        declare_operator_schemas()


def declare_operator_schemas() -> None:
    global _schema_library, torchvision_was_patched
    if _schema_library is None:
        _schema_library = torch.library.Library("torchvision", "DEF")
        for schema in OPERATOR_SCHEMAS:
            _schema_library.define(schema)
    torchvision_was_patched = True


def quiet_transformers() -> None:
    """Loading a model from disk takes a moment; its per-tensor progress bar is noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
