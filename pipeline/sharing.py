"""A captioner shared like a Hugging Face model: save_pretrained, push_to_hub, from_pretrained.

    from pipeline.sharing import Captioner

    captioner = Captioner.from_checkpoint("runs/coco-gpt2/finetune/best")
    captioner.save_pretrained("shared/ituning-coco")   # the checkpoint plus README.md, its model card
    captioner.push_to_hub("me/ituning-coco")           # creates the repository if needed; returns the commit
    captioner = Captioner.from_pretrained("me/ituning-coco")

The captioner is ituning's; what this adds is publishing: the model card and the hub transfers of
pipeline/model_card.py.
"""

import tempfile
from pathlib import Path

from ituning.backbones import BackboneUnavailable
from ituning.captioner import Captioner as LocalCaptioner
from ituning.checkpoint import read_config
from ituning.model import count_trainable

from pipeline.model_card import (CardFacts, RunRecord, create_model_repo, download_model_folder,
                                 missing_local_backbones, upload_model_folder, write_model_card)


class Captioner(LocalCaptioner):
    """ituning's Captioner, with a model card and the way to the hub and back."""

    def save_pretrained(self, directory: str | Path, record=None, repo_id: str | None = None) -> Path:
        """The checkpoint (adapter_model.safetensors, adapter_config.json) plus its model card README.md:
        a folder that from_pretrained loads, and `ituning caption --checkpoint` too. `record`
        (pipeline.model_card.RunRecord) gives the card the run's data sets and scores; `repo_id`, the
        name it tells to load the model by."""
        directory = self.save(directory)
        write_model_card(directory, CardFacts(read_config(directory), count_trainable(self.model), repo_id,
                                              str(directory), record or RunRecord()))
        return directory

    @classmethod
    def from_pretrained(cls, source: str | Path, device="auto", revision: str | None = None,
                        token: str | None = None, cache_dir: str | Path | None = None,
                        local_folders: bool = True) -> "Captioner":
        """A captioner from a folder (save_pretrained's, or any checkpoint folder) or from a hub
        repository "OWNER/NAME" at `revision` (a branch, tag or commit; default main). Only the card,
        config and safetensors files are downloaded, into the hub cache (HF_HOME); the backbones load
        as for any checkpoint. A model trained on backbones in local folders loads where those exist.
        `local_folders=False`: `source` is a hub repository even where a folder of that name exists."""
        if local_folders and Path(source).is_dir():
            return cls.from_checkpoint(source, device)
        folder = download_model_folder(str(source), revision, token, cache_dir)
        missing = missing_local_backbones(read_config(folder)["backbones"])
        if missing:
            raise BackboneUnavailable(
                f"{source} was trained on backbones in local folders that this machine lacks: {', '.join(missing)} "
                "(its model card names them); it loads where those paths exist")
        return cls.from_checkpoint(folder, device)

    def push_to_hub(self, repo_id: str, record=None, private: bool = False, revision: str | None = None,
                    token: str | None = None, commit_message: str | None = None):
        """Share the captioner on the hub (HF_ENDPOINT; token from HF_TOKEN or `hf auth login`):
        create the repository (private if asked) and the branch `revision` unless they exist, then
        upload save_pretrained's folder as one commit. Returns that commit: a str, its URL, with
        `.repo_url` and `.oid`."""
        repo_id = create_model_repo(repo_id, private, revision, token)
        with tempfile.TemporaryDirectory(prefix="ituning-push-") as folder:
            self.save_pretrained(folder, record, repo_id)
            return upload_model_folder(folder, repo_id, revision, token, commit_message)
