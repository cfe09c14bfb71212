"""Make torchvision importable on a CPU-only torch paired with a CUDA torchvision build.

The only torchvision on the registry for torch 2.13.0 is a CUDA build. Its compiled operators need
the CUDA libraries, so on a CPU torch `import torchvision` fails with
"operator torchvision::nms does not exist" -- and open_clip, timm and transformers fail with it,
because they import torchvision. Declaring the two operator schemas its Python side registers fake
kernels for lets the pure-Python parts (transforms, models) import and work. torchvision.ops and
torchvision.io stay unusable there; the project decodes images with PIL and needs neither.

This happens in one place, at the start of a process: importing the `ituning` package puts
`TorchvisionImportFinder` in front of the import system (`install_finder`). The finder does
nothing until torchvision is first imported; then it steps aside and, only if torchvision's
compiled operators cannot load, declares the schemas, and the import goes on as usual. Where the
builds match, nothing changes. An environment can also run the finder at interpreter start-up, for
programs that import open_clip or transformers without importing ituning (pipeline/torchvision_hook.py
writes the .pth file that does it). Setting ITUNING_NO_TORCHVISION_HOOK turns the finder off.
"""

import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path

OPT_OUT = "ITUNING_NO_TORCHVISION_HOOK"  # set (to anything) to run without the finder
OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)

_schema_library = None  # kept alive: dropping the Library object would unregister the schemas
torchvision_was_patched = False


class TorchvisionImportFinder:
    """A meta path finder that prepares torchvision's first import, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall_finder()
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            prepare_torchvision_import(Path(list(spec.submodule_search_locations)[0]))
        return None  # the usual finders load it


def install_finder() -> None:
    """Put the finder in front of the import system, unless torchvision is already imported."""
    if os.environ.get(OPT_OUT):
        return
    if "torchvision" not in sys.modules and not any(isinstance(f, TorchvisionImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionImportFinder())


def uninstall_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, TorchvisionImportFinder)]


def prepare_torchvision_import(package_dir: Path) -> None:
    """Before torchvision's first import: declare the operator schemas if its compiled operators
    cannot load, so that the import succeeds the first time."""
    import torch  # here, not at the top: the finder is installed at start-up, before anything needs torch

    compiled = sorted(Path(package_dir).glob("_C*.so")) + sorted(Path(package_dir).glob("_C*.pyd"))
    if not compiled or _schema_library is not None:
        return
    try:
        torch.ops.load_library(str(compiled[0]))  # what torchvision itself does first
    except OSError:
        declare_operator_schemas(torch)


def declare_operator_schemas(torch) -> None:
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
