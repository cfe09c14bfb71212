"""A stage's cleanup (a rerun with changed settings empties the stage folder) never reaches outside
the run's own folder, whatever the names or links on the way."""

import pytest
import yaml

from pipeline import training

CHANGED = {"settings": "changed since the checkpoints were written"}


@pytest.fixture
def workspace(tmp_path):
    """runs/x (this run, one stage), runs/other (another run) and a folder outside the workspace."""
    runs = tmp_path / "workspace" / "runs"
    (runs / "x" / "finetune" / "last").mkdir(parents=True)
    (runs / "other" / "finetune" / "final").mkdir(parents=True)
    (runs / "other" / "finetune" / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "notes.txt").write_text("keep")
    return tmp_path / "workspace"


def untouched(workspace) -> bool:
    return ((workspace / "runs" / "other" / "finetune" / "final" / "adapter_model.safetensors").is_file()
            and (workspace.parent / "victim" / "notes.txt").read_text() == "keep")


@pytest.mark.parametrize("stage", ["..", "../other/finetune", "../../../victim", "link"])
def test_the_stage_cleanup_refuses_a_folder_a_name_or_link_leads_out_to(workspace, stage):
    run_dir = workspace / "runs" / "x"
    if stage == "link":
        (run_dir / "link").symlink_to(workspace.parent / "victim", target_is_directory=True)
    with pytest.raises(ValueError, match="refusing to empty it"):
        training._empty_unless_trained_from(run_dir / stage, CHANGED)
    assert untouched(workspace) and (run_dir / "finetune" / "last").is_dir()


def test_the_stage_cleanup_empties_its_own_folder_and_follows_no_link_inside_it(workspace):
    stage_dir = workspace / "runs" / "x" / "finetune"
    (stage_dir / "outside").symlink_to(workspace.parent / "victim", target_is_directory=True)
    training._empty_unless_trained_from(stage_dir, CHANGED)
    assert not (stage_dir / "last").exists() and (stage_dir / training.TRAINED_FROM).is_file()
    assert untouched(workspace)


def test_a_run_folder_linked_out_of_the_workspace_runs_is_refused_before_anything_is_touched(workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (workspace / "runs" / "tiny").symlink_to(workspace.parent / "victim", target_is_directory=True)
    config = {"name": "tiny", "device": "cpu", "model": {"vision_pretrained": None},
              "stages": [{"name": "finetune", "dataset": "coco", "epochs": 1}]}
    (workspace / "tiny.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"tiny: the run folder .* not to a folder of .*runs; pass out_dir"):
        training.train_stage(workspace, str(workspace / "tiny.yaml"), "finetune")
    assert untouched(workspace) and sorted(path.name for path in workspace.iterdir()) == ["runs", "tiny.yaml"]
