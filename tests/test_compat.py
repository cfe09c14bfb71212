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
