from pathlib import Path

from storage.workspace import catalog_path, data_dir, downloads_dir, workspace_root


def test_workspace_root_prefers_override_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv("ITUNING_WORKSPACE", raising=False)
    assert workspace_root() == Path("workspace")
    monkeypatch.setenv("ITUNING_WORKSPACE", str(tmp_path / "env"))
    assert workspace_root() == tmp_path / "env"
    assert workspace_root(tmp_path / "flag") == tmp_path / "flag"
    root = workspace_root()
    assert (downloads_dir(root, "coco"), data_dir(root, "vg"), catalog_path(root)) == (
        root / "downloads" / "coco", root / "data" / "vg", root / "catalog.duckdb")
