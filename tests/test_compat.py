"""torchvision imports on a CPU-only torch paired with a CUDA torchvision build (ituning/compat.py):
the real interpreter of the environment, the real packages, fresh processes."""

import importlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from ituning import compat

ROOT = Path(__file__).resolve().parents[1]


def builds_mismatch() -> bool:
    import torchvision

    return torch.version.cuda is None and "+cu" in torchvision.__version__


def test_torchvision_and_its_dependents_import():
    for module in ("torchvision.transforms", "open_clip", "transformers"):
        importlib.import_module(module)
    from transformers import GPT2LMHeadModel  # noqa: F401  (imports torchvision when present)


def test_the_schemas_are_declared_only_where_the_builds_mismatch():
    assert compat.torchvision_was_patched == builds_mismatch()


def test_installing_the_finder_again_changes_nothing():
    before = list(sys.meta_path)
    compat.install_finder()  # torchvision is imported by now: nothing to prepare
    assert sys.meta_path == before
    assert not any(isinstance(finder, compat.TorchvisionImportFinder) for finder in sys.meta_path)


FRESH_IMPORTS = ("import open_clip, timm, transformers, torchvision; from transformers import CLIPModel; "
                 "print(torchvision.__version__)")


def test_a_fresh_interpreter_imports_open_clip_timm_and_transformers_directly(tmp_path):
    """As a notebook in the project's environment would: nothing of the project imported first."""
    result = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_ituning_is_enough_without_the_start_up_file(tmp_path):
    """No site-packages .pth runs (-S): the package's own import prepares torchvision, once, before
    open_clip and transformers import it. With the finder turned off, the mismatch shows as it is."""
    program = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {sysconfig.get_paths()['purelib']!r}]; "
               "import ituning, ituning.compat as c; import open_clip, transformers; "
               "from transformers import GPT2LMHeadModel; print(c.torchvision_was_patched)")
    plain = {key: value for key, value in os.environ.items() if key != compat.OPT_OUT}
    result = subprocess.run([sys.executable, "-S", "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            env=plain)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(builds_mismatch())]
    turned_off = subprocess.run([sys.executable, "-S", "-c", program], cwd=tmp_path, capture_output=True,
                                text=True, env={**plain, compat.OPT_OUT: "1"})
    assert (turned_off.returncode != 0) == builds_mismatch(), turned_off.stderr[-2000:]


def test_the_start_up_hook_is_installed_only_where_the_builds_mismatch():
    from pipeline import torchvision_hook

    assert torchvision_hook.pth_path().is_file() == builds_mismatch()
    assert torchvision_hook.torchvision_needs_help() == builds_mismatch()
