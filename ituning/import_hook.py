"""Let any program in the environment import torchvision (and open_clip, timm, transformers)
where a CPU-only torch is paired with a CUDA torchvision build (see ituning/compat.py).

`python -m ituning.import_hook install` checks, in a fresh interpreter, whether
`import torchvision` fails for want of its CUDA operators. Only then does it write
ituning-import-hook.pth into the environment's site-packages; Python runs that file's one line at
start-up, which puts a finder in front of the import system. The finder does nothing until
torchvision is first imported; then it removes itself and declares the operator schemas if the
compiled operators cannot load (ituning.compat.prepare_torchvision_import), and the import goes on
as usual. Where the builds match, no file is written (an earlier one is removed) and nothing changes.
Start-up costs one small import; torch is not loaded before something imports torchvision.
Setting ITUNING_NO_TORCHVISION_HOOK turns the finder off.
"""

import os
import subprocess
import sys
import sysconfig
from importlib.machinery import PathFinder
from pathlib import Path

PTH_NAME = "ituning-import-hook.pth"
PTH_LINE = "import ituning.import_hook as hook; hook.install_finder()\n"
MISSING_OPERATOR = "torchvision::nms does not exist"
OPT_OUT = "ITUNING_NO_TORCHVISION_HOOK"  # set (to anything) to run without the finder


class TorchvisionImportFinder:
    """A meta path finder that prepares torchvision's first import, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall_finder()
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            from ituning.compat import prepare_torchvision_import

            prepare_torchvision_import(Path(list(spec.submodule_search_locations)[0]))
        return None  # the usual finders load it


def install_finder() -> None:
    if os.environ.get(OPT_OUT):
        return
    if "torchvision" not in sys.modules and not any(isinstance(f, TorchvisionImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionImportFinder())


def uninstall_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, TorchvisionImportFinder)]


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def torchvision_needs_help() -> bool:
    """Whether a fresh interpreter, without the hook, fails to import torchvision for want of its operators."""
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                            env={**os.environ, OPT_OUT: "1"})
    return result.returncode != 0 and MISSING_OPERATOR in result.stderr


def install() -> bool:
    """Write the .pth file where it is needed, remove it where not; returns whether it is in place."""
    path = pth_path()
    path.unlink(missing_ok=True)
    if not torchvision_needs_help():
        return False
    path.write_text(PTH_LINE)
    return True


if __name__ == "__main__" and sys.argv[1:] == ["install"]:
    needed = install()
    print(f"{pth_path()}: {'written' if needed else 'not needed (torch and torchvision match)'}")
