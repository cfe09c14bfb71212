"""The real download path of the backbones, end to end, against a Hugging Face hub on loopback
(tests/hub_server.py): the user's own code runs in a child process with HF_ENDPOINT on that hub and a
fresh HF_HOME, downloads into the hub cache, then loads from that cache offline."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ituning.config import load_config
from tests.hub_server import HubServer, hub_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2 = "openai-community/gpt2"  # what the hub calls "gpt2" since the move: it answers the old name with a 307
TINY_CLIP = "tiny-org/tiny-clip"  # an open_clip repo: open_clip_config.json + open_clip_model.safetensors
VIT_B_16_OPENAI = "timm/vit_base_patch16_clip_224.openai"  # where open_clip 3.3 fetches ViT-B-16 "openai"
SERVED_SEED = 1234  # not torch's default seed: weights a fresh process initialises never equal the served ones

# Loads backbones the way the pipeline does and compares every served tensor with the loaded one.
LOAD = """
import json, sys
import torch
from safetensors.torch import load_file
from ituning.backbones import BackboneSpec, hub_reachable, load_language_model, load_vision_encoder

def compare(state, served_file):
    served = load_file(served_file)
    shared = [key for key in served if key in state]
    return {"compared": len(shared),
            "different": [key for key in shared if not torch.equal(state[key], served[key].to(state[key].dtype))]}

report = {"hub_reachable": hub_reachable()}
for job in json.loads(sys.argv[1]):
    if "language_model" in job:
        model, tokenizer = load_language_model(job["language_model"])
        text = tokenizer.decode(tokenizer("a red circle").input_ids)
        report[job["language_model"]] = {"vocab": len(tokenizer), "text": text,
                                         **compare(model.state_dict(), job["served"])}
    else:
        encoder = load_vision_encoder(BackboneSpec(job["vision_model"], job["vision_pretrained"]))
        state = {f"visual.{key}": value for key, value in encoder.visual.state_dict().items()}
        activation = type(encoder.visual.transformer.resblocks[0].mlp.gelu).__name__
        report[job["vision_model"]] = {"width": encoder.width, "activation": activation,
                                       **compare(state, job["served"])}
print(json.dumps(report))
"""


def run_json(command: list[str], env: dict) -> dict:
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_backbones(jobs: list[dict], env: dict) -> dict:
    return run_json([sys.executable, "-c", LOAD, json.dumps(jobs)], env)


def downloads(hub: HubServer, requests) -> list[str]:
    """The files whose bytes were sent: repo files (GET on /resolve/) and CDN blobs, by repo path."""
    sent = []
    for role, method, path in requests:
        if method == "GET" and role == "hub" and "/resolve/" in path:
            sent.append(path.partition("/resolve/")[2].partition("/")[2])
        elif method == "GET" and role == "cdn":
            sent.append(hub.blob(path.strip("/").partition("?")[0]).path)
    return sorted(sent)


def assert_cached(hf_home: Path, requested_as: str, repo) -> None:
    """The hub cache layout: refs/main holds the commit, snapshots/<commit>/<file> the served bytes."""
    storage = hf_home / "hub" / f"models--{requested_as.replace('/', '--')}"
    assert (storage / "refs" / "main").read_text() == repo.commit
    for path, file in repo.files.items():
        assert (storage / "snapshots" / repo.commit / path).read_bytes() == file.location.read_bytes(), path


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 with its tokenizer, saved as transformers does, and a tiny open_clip repo: the files
    a hub repository holds, without the mark our stand-ins carry on disk."""
    from tests.scene_images import scene_captions
    from ituning.provenance import STANDIN_MARKER
    from ituning.standins import new_language_standin, save_language_standin, save_vision_standin, train_tokenizer

    root = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(scene_captions() * 10)
    save_language_standin(root / "gpt2", tokenizer, new_language_standin(tokenizer, SERVED_SEED))
    save_vision_standin(root / "tiny-clip", SERVED_SEED)
    for folder in (root / "gpt2", root / "tiny-clip"):
        (folder / STANDIN_MARKER).unlink()
    return {GPT2: root / "gpt2", TINY_CLIP: root / "tiny-clip"}


@pytest.fixture
def hub(served_models):
    with HubServer() as server:
        server.add_repo(GPT2, served_models[GPT2], renamed_from=("gpt2",))
        server.add_repo(TINY_CLIP, served_models[TINY_CLIP])
        yield server


def test_the_loopback_hub_answers_as_the_hub_does(hub, served_models, tmp_path, monkeypatch):
    """huggingface_hub's own calls, in this process (`endpoint=` instead of HF_ENDPOINT)."""
    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run offline by default
    repo, cache = hub.repos[TINY_CLIP], tmp_path / "cache"
    snapshot = Path(huggingface_hub.snapshot_download(TINY_CLIP, endpoint=hub.endpoint, cache_dir=cache))
    assert snapshot.name == repo.commit and sorted(p.name for p in snapshot.iterdir()) == sorted(repo.files)
    assert (snapshot / "open_clip_model.safetensors").read_bytes() == (
        served_models[TINY_CLIP] / "open_clip_model.safetensors").read_bytes()
    renamed = huggingface_hub.hf_hub_download("gpt2", "config.json", endpoint=hub.endpoint, cache_dir=cache)
    assert Path(renamed).read_bytes() == (served_models[GPT2] / "config.json").read_bytes()

    with pytest.raises(RemoteEntryNotFoundError):
        huggingface_hub.hf_hub_download(TINY_CLIP, "missing.json", endpoint=hub.endpoint, cache_dir=cache)
    assert (cache / f"models--{TINY_CLIP.replace('/', '--')}" / ".no_exist" / repo.commit / "missing.json").exists()
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download(TINY_CLIP, "open_clip_config.json", revision="v9", endpoint=hub.endpoint,
                                        cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("nobody/nothing", "config.json", endpoint=hub.endpoint, cache_dir=cache)

    weights = repo.files["open_clip_model.safetensors"]
    request = urllib.request.Request(f"{hub.cdn}/{weights.sha256}", headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(request) as resumed:  # how a broken download resumes
        assert resumed.status == 206 and resumed.read() == weights.location.read_bytes()[100:]


def backbone_jobs(served_models) -> list[dict]:
    """The coco-gpt2 preset's language model and a tiny `hf-hub:` open_clip encoder."""
    return [{"language_model": "gpt2", "served": str(served_models[GPT2] / "model.safetensors")},
            {"vision_model": f"hf-hub:{TINY_CLIP}", "vision_pretrained": None,
             "served": str(served_models[TINY_CLIP] / "open_clip_model.safetensors")}]


def assert_served_weights(report: dict, served_models) -> None:
    gpt2, clip = report["gpt2"], report[f"hf-hub:{TINY_CLIP}"]
    assert gpt2["compared"] == len(load_file(served_models[GPT2] / "model.safetensors")) and gpt2["different"] == []
    assert gpt2["vocab"] > 100 and gpt2["text"] == "a red circle"  # an empty tokenizer would not round-trip
    served_clip = load_file(served_models[TINY_CLIP] / "open_clip_model.safetensors")
    assert clip["compared"] == len([key for key in served_clip if key.startswith("visual.")])
    assert clip["different"] == []


def test_backbones_download_into_the_hub_cache_then_load_offline(hub, served_models, tmp_path):
    hf_home = tmp_path / "hf-home"
    first = load_backbones(backbone_jobs(served_models), hub_environment(hub.endpoint, hf_home))
    assert first["hub_reachable"]
    assert_served_weights(first, served_models)
    requests = hub.take_requests()
    every_file = sorted([*hub.repos[GPT2].files, *hub.repos[TINY_CLIP].files])
    assert downloads(hub, requests) == every_file  # each file once; the weights from the CDN
    assert ("hub", "GET", "/api/models/gpt2/revision/main") in requests  # asked by its old name ...
    assert_cached(hf_home, "gpt2", hub.repos[GPT2])  # ... and cached under it
    assert_cached(hf_home, TINY_CLIP, hub.repos[TINY_CLIP])

    offline = load_backbones(backbone_jobs(served_models), hub_environment(hub.endpoint, hf_home, offline=True))
    assert not offline["hub_reachable"]
    assert_served_weights(offline, served_models)
    assert hub.take_requests() == []


@pytest.mark.slow
def test_cached_backbones_are_not_sent_again_and_load_while_the_hub_is_down(hub, served_models, tmp_path):
    hf_home = tmp_path / "hf-home"
    load_backbones(backbone_jobs(served_models), hub_environment(hub.endpoint, hf_home))
    hub.take_requests()

    again = load_backbones(backbone_jobs(served_models), hub_environment(hub.endpoint, hf_home))
    assert_served_weights(again, served_models)
    requests = hub.take_requests()
    assert requests and downloads(hub, requests) == []  # checked with HEAD requests, nothing sent again

    down = load_backbones(backbone_jobs(served_models), hub_environment("http://127.0.0.1:9", hf_home))
    assert not down["hub_reachable"]  # nothing listens on the discard port; HF_HUB_OFFLINE is unset
    assert_served_weights(down, served_models)


PIPELINE_ENVIRONMENT = """
import json, os, sys, types

class Stop(Exception):
    pass

seen = {}
def run_full_pipeline(config, **settings):  # stands in for the flow: what matters is the environment it runs in
    seen[config] = os.environ.get("HF_HUB_OFFLINE")
    raise Stop

sys.modules["flows.in_process"] = types.ModuleType("flows.in_process")  # the module `ituning pipeline` imports
sys.modules["flows.in_process"].run_full_pipeline = run_full_pipeline
from cli.main import app

for arguments in (["pipeline", "--config", "coco-gpt2", "--source", "download"], ["demo"]):
    before = dict(os.environ)
    try:
        app([*arguments, "--workspace", sys.argv[1]], standalone_mode=False)
    except Stop:
        pass
    os.environ.clear()
    os.environ.update(before)
print(json.dumps(seen))
"""


def test_pipeline_leaves_the_hub_online_and_only_the_demo_runs_offline(tmp_path):
    env = hub_environment("http://127.0.0.1:9", tmp_path / "hf-home")
    seen = run_json([sys.executable, "-c", PIPELINE_ENVIRONMENT, str(tmp_path / "workspace")], env)
    assert seen == {"coco-gpt2": None, "demo": "1"}


@pytest.fixture(scope="session")
def vit_b_16_openai(tmp_path_factory) -> Path:
    """A ViT-B-16 CLIP repo as the hub holds OpenAI's weights: random ones here, float16 (about 300 MB)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vit-b-16-openai")
    torch.manual_seed(SERVED_SEED)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    save_file({key: value.half().contiguous() for key, value in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    config = {"model_cfg": {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def catalogued_workspace(tmp_path) -> Path:
    from storage.acquire import download_dataset
    from storage.catalog import Catalog
    from pipeline.data import build_dataset
    from storage.manifests import load_manifest
    from storage.synthetic import write_corpus
    from storage.workspace import catalog_path

    root = tmp_path / "workspace"
    corpus = write_corpus(tmp_path / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), root)
    with Catalog(catalog_path(root)) as catalog:
        build_dataset(root, "coco", catalog, workers=1)
    return root


@pytest.mark.slow
def test_coco_gpt2_backbones_download_through_the_cli_then_load_offline(
    hub, served_models, vit_b_16_openai, catalogued_workspace, tmp_path
):
    import h5py

    spec = load_config(REPO_ROOT / "configs" / "coco-gpt2.yaml").model.backbones()
    assert (spec.vision_model, spec.vision_pretrained, spec.language_model) == ("ViT-B-16", "openai", "gpt2")
    repo = hub.add_repo(VIT_B_16_OPENAI, vit_b_16_openai)
    hf_home = tmp_path / "hf-home"
    online = hub_environment(hub.endpoint, hf_home)

    features = subprocess.run(  # `ituning features` defaults to the preset's encoder
        [str(Path(sys.executable).with_name("ituning")), "features", "--dataset", "coco", "--split", "train",
         "--workspace", str(catalogued_workspace), "--device", "cpu", "--workers", "0", "--batch-size", "4"],
        cwd=REPO_ROOT, env=online, capture_output=True, text=True)
    assert features.returncode == 0, features.stderr[-4000:]
    requests = hub.take_requests()
    assert downloads(hub, requests) == ["open_clip_model.safetensors"]  # the safetensors weights, asked first
    assert ("hub", "HEAD", f"/{VIT_B_16_OPENAI}/resolve/main/open_clip_model.safetensors") in requests
    cached = hf_home / "hub" / f"models--{VIT_B_16_OPENAI.replace('/', '--')}" / "snapshots" / repo.commit
    assert (cached / "open_clip_model.safetensors").stat().st_size == repo.files["open_clip_model.safetensors"].size
    entry = Path(features.stdout.split("entry point: ")[1].splitlines()[0])
    with h5py.File(min(entry.parent.glob("shard-*.h5")), "r") as shard:
        assert shard["tokens"].shape[1:] == (197, 768)  # class token + 14 x 14 patches of ViT-B-16

    jobs = [{"language_model": spec.language_model, "served": str(served_models[GPT2] / "model.safetensors")},
            {"vision_model": spec.vision_model, "vision_pretrained": spec.vision_pretrained,
             "served": str(vit_b_16_openai / "open_clip_model.safetensors")}]
    assert load_backbones(jobs, online)["gpt2"]["different"] == []
    assert downloads(hub, hub.take_requests()) == sorted(hub.repos[GPT2].files)  # CLIP came from the cache
    offline = load_backbones(jobs, hub_environment(hub.endpoint, hf_home, offline=True))
    assert hub.take_requests() == []
    vision = offline["ViT-B-16"]
    served_clip = load_file(vit_b_16_openai / "open_clip_model.safetensors")
    assert vision["compared"] == len([key for key in served_clip if key.startswith("visual.")])
    assert vision["different"] == []
    assert vision["width"] == 768 and vision["activation"] == "QuickGELU"  # OpenAI's weights were trained with it
    assert offline["gpt2"]["different"] == []
