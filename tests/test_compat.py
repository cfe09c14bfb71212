import importlib

import torch

from ituning import compat


def test_torchvision_and_its_dependents_import():
    for module in ("torchvision.transforms", "open_clip", "transformers"):
        importlib.import_module(module)
    from transformers import GPT2LMHeadModel  # noqa: F401  (imports torchvision when present)


def test_the_schemas_are_declared_only_where_the_builds_mismatch():
    import torchvision

    cpu_torch_with_cuda_torchvision = torch.version.cuda is None and "+cu" in torchvision.__version__
    assert compat.torchvision_was_patched == cpu_torch_with_cuda_torchvision


def test_calling_it_again_changes_nothing():
    before = compat.torchvision_was_patched
    compat.ensure_torchvision_importable()
    assert compat.torchvision_was_patched == before


FRESH_IMPORTS = ("import open_clip, timm, transformers, torchvision; from transformers import CLIPModel; "
                 "print(torchvision.__version__)")


def test_a_fresh_interpreter_imports_open_clip_timm_and_transformers_directly(tmp_path):
    """As a notebook in the project's environment would: nothing of the project imported first."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_start_up_hook_is_installed_only_where_the_builds_mismatch():
    import torchvision

    from ituning import import_hook

    mismatch = torch.version.cuda is None and "+cu" in torchvision.__version__
    assert import_hook.pth_path().is_file() == mismatch
    assert import_hook.torchvision_needs_help() == mismatch
