"""Let any program in the environment import torchvision (and open_clip, timm, transformers)
where a CPU-only torch is paired with a CUDA torchvision build (see ituning/compat.py).

`python -m pipeline.torchvision_hook install` checks, in a fresh interpreter, whether
`import torchvision` fails for want of its CUDA operators. Only then does it write
ituning-import-hook.pth into the environment's site-packages; Python runs that file's one line at
start-up, which puts ituning's import finder in front of the import system before anything else
runs. Where the builds match, no file is written (an earlier one is removed) and nothing changes.
Start-up costs one small import; torch is not loaded before something imports torchvision.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from ituning.compat import OPT_OUT

PTH_NAME = "ituning-import-hook.pth"
PTH_LINE = "import ituning.import_hook as hook; hook.install_finder()\n"
MISSING_OPERATOR = "torchvision::nms does not exist"


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def torchvision_needs_help() -> bool:
    """Whether a fresh interpreter, without the finder, fails to import torchvision for want of its operators."""
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
