"""The registry of datasets (storage/datasets/): it refuses a dataset module that misses a part, and
every dataset it holds reaches the command line's choices, the flows' parameter schema and the
catalog. Flickr8k, the dataset added through it alone, is read from a real record of its split file."""

import dataclasses
import json
import random
import re
import types
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate
from typer.testing import CliRunner

from flows.download_datasets import download_datasets
from flows.full_pipeline import full_pipeline
from cli.main import app
from storage.catalog import Catalog
from storage.datasets import (Dataset, RegistryError, UnknownDataset, all_datasets, check_registry, dataset_names,
                              describe_module, get_dataset)
from storage.scenes import random_scene, render_scene
from storage.workspace import catalog_path, data_dir

FLICKR8K_RECORD = Path(__file__).parent / "data" / "flickr8k" / "dataset_flickr8k.excerpt.json"


def complete(**changes) -> Dataset:
    """A dataset described in full (a copy of COCO's description under another name), with changes."""
    return dataclasses.replace(get_dataset("coco"), name="extra", **changes)


@pytest.mark.parametrize("changes, problem", [
    ({"val_split": "dev"}, "extra: val_split 'dev' is not one of its splits"),
    ({"evaluation_splits": ("val", "holdout")}, "extra: evaluation split 'holdout' is not one of its splits"),
    ({"needs": ("imagenet",)}, "extra: needs unknown dataset 'imagenet'"),
    ({"read": None}, "extra: read is not callable"),
    ({"write_synthetic": "storage.synthetic"}, "extra: write_synthetic is not callable"),
    ({"title": ""}, "extra: title is empty"),
    ({"train_split": None}, "extra: a validation split without a training split"),
    ({"server_only_split": "train"}, "extra: server_only_split is not one of its evaluation splits"),
])
def test_the_registry_refuses_a_dataset_that_misses_a_part(changes, problem):
    with pytest.raises(RegistryError, match=problem):
        check_registry([*all_datasets(), complete(**changes)])


def test_a_module_must_hold_its_dataset_under_its_own_name():
    with pytest.raises(RegistryError, match=r"storage/datasets/extra.py holds no DATASET"):
        describe_module(types.ModuleType("extra"), "extra")
    named_otherwise = types.SimpleNamespace(DATASET=complete())
    with pytest.raises(RegistryError, match="describes 'extra'; name the module after it"):
        describe_module(named_otherwise, "other")
    with pytest.raises(RegistryError, match="coco: described by two modules"):
        check_registry([*all_datasets(), get_dataset("coco")])
    with pytest.raises(TypeError, match="read"):  # a required part left out fails when the module loads
        Dataset(**{field.name: getattr(complete(), field.name) for field in dataclasses.fields(Dataset)
                   if field.name != "read"})


def test_the_registry_holds_every_dataset_after_those_it_needs():
    names = dataset_names()
    assert {"coco", "flickr30k", "flickr8k", "vg", "nocaps"} <= set(names)
    assert names.index("vg") > names.index("coco")
    for dataset in all_datasets():
        assert dataset.manifest().dataset == dataset.name
    with pytest.raises(UnknownDataset, match="unknown dataset 'imagenet'; choose one of coco, "):
        get_dataset("imagenet")


def offered(*args: str) -> tuple[str, ...]:
    """The choices a command names when it refuses an unknown dataset (a usage error, exit 2)."""
    refused = CliRunner().invoke(app, list(args), env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert refused.exit_code == 2, refused.output
    return tuple(re.findall(r"'([^']+)'", re.search(r"'imagenet' is not one of (.*)\.", refused.output)[1]))


def test_every_dataset_is_a_choice_of_the_commands_and_the_flow_parameters():
    names = dataset_names()
    scored = tuple(dataset.name for dataset in all_datasets() if dataset.evaluation_splits)
    assert offered("download", "imagenet") == names
    assert offered("features", "--dataset", "imagenet", "--split", "train") == names
    assert offered("evaluate", "--checkpoint", "best", "--dataset", "imagenet") == scored
    assert offered("catalog", "build", "imagenet") == names
    pipeline_schema = parameter_schema(full_pipeline).model_dump_for_openapi()
    for name in names:
        validate({"config": "demo", "manifests": {name: "m.json"}, "image_archives": {name: "a.zip"}},
                 pipeline_schema, raise_on_error=True)
    for name in scored:
        validate({"config": "demo", "evaluate_on": [f"{name}/test", "val"]}, pipeline_schema, raise_on_error=True)
    for bad in ({"evaluate_on": ["vg/test"]}, {"evaluate_on": ["imagenet/val"]}, {"manifests": {"imagenet": "m"}}):
        with pytest.raises(ValidationError):
            validate({"config": "demo", **bad}, pipeline_schema, raise_on_error=True)
    download_schema = parameter_schema(download_datasets).model_dump_for_openapi()
    validate({"datasets": list(names)}, download_schema, raise_on_error=True)


def test_flickr8k_is_catalogued_from_a_record_of_its_published_split_file(tmp_path):
    folder = data_dir(tmp_path, "flickr8k")
    (folder / "Flicker8k_Dataset").mkdir(parents=True)
    record = json.loads(FLICKR8K_RECORD.read_text())
    (folder / "dataset_flickr8k.json").write_text(json.dumps(record))
    render_scene(random_scene(random.Random(1)), 32).save(folder / "Flicker8k_Dataset" / "2513260012_03d33305cf.jpg")

    built = CliRunner().invoke(app, ["catalog", "build", "flickr8k", "--workspace", str(tmp_path), "--workers", "1"])

    assert built.exit_code == 0, built.output
    assert "flickr8k: 1 images (1 usable: train 1), 5 captions" in built.output
    with Catalog(catalog_path(tmp_path), read_only=True) as catalog:
        _, rows = catalog.query("SELECT image_id, split, path, status, width FROM images WHERE dataset = 'flickr8k'")
        assert rows == [("2513260012_03d33305cf", "train", "data/flickr8k/Flicker8k_Dataset/2513260012_03d33305cf.jpg",
                         "ok", 32)]
        captions = catalog.captions("flickr8k", "train")["2513260012_03d33305cf"]
        assert captions[0] == "A black dog is running after a white dog in the snow ." and len(captions) == 5
        _, builds = catalog.query("SELECT synthetic FROM builds WHERE dataset = 'flickr8k'")
        assert builds == [(False,)]  # the real format, not marked synthetic
