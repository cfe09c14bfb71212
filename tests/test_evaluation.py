import json
import sys

import pytest

from ituning import evaluation
from ituning.evaluation import (
    CORENLP_JARS,
    METRICS,
    domain_table,
    missing_domains_note,
    score_by_domain,
    score_captions,
    spice_available,
    write_nocaps_submission,
)
from ituning.validation import evaluate_split, generate_captions
from pipeline.evaluation import score_nocaps

# Candidates of mixed quality, several references each, ids as text like the catalog's.
REFERENCES = {
    "101": ["a red circle in the middle of a grey picture", "a red round shape in the centre", "red circle"],
    "102": ["two blue squares side by side", "a pair of blue boxes next to each other"],
    "103": ["a yellow triangle above a green circle", "a green circle under a yellow triangle"],
    "104": ["a dog runs across the grass", "a brown dog running on a lawn", "a dog playing outside"],
    "105": ["a man rides a bicycle down a street", "a cyclist on a city road"],
    "106": ["a plate of food with vegetables", "vegetables and rice on a white plate"],
    "107": ["a cat sleeping on a sofa", "a grey cat asleep on the couch"],
    "108": ["an aeroplane flying in a blue sky", "a plane in the clear sky"],
}
CANDIDATES = {
    "101": "a red circle in the middle",
    "102": "two blue squares next to each other",
    "103": "a green circle under a yellow triangle",
    "104": "a dog running on the grass",
    "105": "a man riding a bike on a street",
    "106": "a plate with rice and vegetables.",
    "107": "a cat on a couch",
    "108": "a bird in the sky",
}
DOMAINS = {"101": "in-domain", "102": "in-domain", "103": "in-domain", "104": "near-domain",
           "105": "near-domain", "106": "near-domain", "107": "out-domain", "108": "out-domain"}
NO_METEOR = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]


def pycocoevalcap_directly(candidates, references, with_meteor=True):
    """The reference computation, written out against pycocoevalcap's own classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in candidates})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores = {f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)}
    scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    if with_meteor:
        scores["METEOR"], _ = Meteor().compute_score(gts, res)
    return scores


@pytest.fixture(scope="module")
def project_scores():
    return score_captions(CANDIDATES, REFERENCES)


@pytest.fixture(scope="module")
def direct_scores():
    return pycocoevalcap_directly(CANDIDATES, REFERENCES)


@pytest.mark.slow
def test_scores_equal_pycocoevalcap_called_directly(project_scores, direct_scores):
    assert set(project_scores) == set(direct_scores) | ({"SPICE"} if spice_available() else set())
    for metric, value in direct_scores.items():
        assert project_scores[metric] == value, metric
    assert list(project_scores) == [m for m in METRICS if m in project_scores]


@pytest.mark.slow
def test_scores_are_raw_values_that_rank_captions(project_scores):
    assert all(0 <= value <= 1 for key, value in project_scores.items() if key != "CIDEr")
    assert 0.5 < project_scores["CIDEr"] < 10  # raw scale, not x100
    worse = score_captions({**CANDIDATES, "101": "a bird in the sky"}, REFERENCES, metrics=["CIDEr"])
    assert worse["CIDEr"] < project_scores["CIDEr"]


def test_each_domain_is_scored_on_its_own_images():
    by_domain = score_by_domain(CANDIDATES, REFERENCES, DOMAINS, metrics=NO_METEOR)
    assert list(by_domain) == ["in-domain", "near-domain", "out-domain", "overall"]
    for domain, scores in by_domain.items():
        keys = [k for k in CANDIDATES if domain == "overall" or DOMAINS[k] == domain]
        expected = pycocoevalcap_directly({k: CANDIDATES[k] for k in keys}, REFERENCES, with_meteor=False)
        assert scores == {metric: expected[metric] for metric in NO_METEOR}, domain
    assert by_domain["in-domain"]["CIDEr"] > by_domain["out-domain"]["CIDEr"]


def test_images_without_a_domain_count_in_overall_only():
    overall = score_captions(CANDIDATES, REFERENCES, metrics=["CIDEr"])
    for domains in ({}, dict.fromkeys(DOMAINS)):  # NoCaps test, or val image info without domains
        assert score_by_domain(CANDIDATES, REFERENCES, domains, metrics=["CIDEr"]) == {"overall": overall}
        assert missing_domains_note(CANDIDATES, domains).startswith("NoCaps domains unknown for all 8 images")
    partial = {key: domain for key, domain in DOMAINS.items() if domain != "out-domain"}
    scores = score_by_domain(CANDIDATES, REFERENCES, partial, metrics=["CIDEr"])
    assert list(scores) == ["in-domain", "near-domain", "overall"] and scores["overall"] == overall
    assert scores["in-domain"] == score_by_domain(CANDIDATES, REFERENCES, DOMAINS, metrics=["CIDEr"])["in-domain"]
    assert missing_domains_note(CANDIDATES, partial).startswith("NoCaps domain unknown for 2 of 8 images")
    assert missing_domains_note(CANDIDATES, DOMAINS) is None


class ListedCaptioner:
    """Captions by the image id its one visual token carries."""

    def caption_features(self, visual, decoding):
        return [CANDIDATES[str(int(row[0, 0]))] for row in visual]


def test_evaluating_nocaps_without_domains_logs_why_scores_are_overall_only(caplog):
    import numpy as np

    tokens = {key: np.full((1, 1), int(key), dtype=np.float32) for key in CANDIDATES}
    with caplog.at_level("WARNING", logger="ituning.validation"):
        captions, scores = evaluate_split(ListedCaptioner(), tokens, REFERENCES, {}, metrics=["CIDEr"])
    assert captions == CANDIDATES and list(scores) == ["overall"]
    assert [record.getMessage() for record in caplog.records] == [missing_domains_note(CANDIDATES, {})]
    caplog.clear()
    _, scores = evaluate_split(ListedCaptioner(), tokens, REFERENCES, DOMAINS, metrics=["CIDEr"])
    assert len(scores) == 4 and not [record for record in caplog.records if record.name == "ituning.validation"]


def test_domain_table_reports_percentages():
    table = domain_table({"in-domain": {"CIDEr": 0.8123}, "overall": {"CIDEr": 0.678, "SPICE": 0.112}})
    lines = table.splitlines()
    assert lines[0] == "| metric | in-domain | overall |"
    assert lines[2] == "| CIDEr | 81.2 | 67.8 |"
    assert lines[3] == "| SPICE | - | 11.2 |"


def test_unknown_domain_and_missing_references_are_refused():
    with pytest.raises(ValueError, match="unknown domains"):
        score_nocaps(CANDIDATES, REFERENCES, {**DOMAINS, "108": "far-domain"}, metrics=["CIDEr"])
    with pytest.raises(ValueError, match="no references"):
        score_captions({**CANDIDATES, "999": "a caption"}, REFERENCES, metrics=["CIDEr"])
    with pytest.raises(ValueError, match="unknown metrics"):
        score_captions(CANDIDATES, REFERENCES, metrics=["CIDEr-D"])


def test_spice_is_detected_from_the_jars_without_downloading(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "pycocoevalcap.spice.spice", raising=False)
    monkeypatch.setattr(evaluation, "spice_library_dir", lambda: tmp_path)
    assert not spice_available()
    (tmp_path / CORENLP_JARS[0]).write_bytes(b"")
    assert not spice_available()
    (tmp_path / CORENLP_JARS[1]).write_bytes(b"")
    assert spice_available()
    assert "pycocoevalcap.spice.spice" not in sys.modules  # importing it would start the download


def test_missing_spice_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "spice_library_dir", lambda: tmp_path)
    with pytest.raises(RuntimeError) as error:
        score_captions(CANDIDATES, REFERENCES, metrics=["SPICE"])
    message = str(error.value)
    assert all(jar in message for jar in CORENLP_JARS)
    assert str(tmp_path) in message and "Java 8 or 11" in message


def test_real_spice_location_is_pycocoevalcaps_lib_folder():
    folder = evaluation.spice_library_dir()
    assert folder.name == "lib" and (folder.parent / "spice-1.0.jar").is_file()


def test_nocaps_submission_has_the_servers_format(tmp_path):
    captions = {"12": "a dog", "3": "a cat", "100": "a tree"}
    path = write_nocaps_submission(captions, tmp_path / "out" / "nocaps_test.json", expected_ids=["3", "12", "100"])
    entries = json.loads(path.read_text())
    assert entries == [{"image_id": 3, "caption": "a cat"}, {"image_id": 12, "caption": "a dog"},
                       {"image_id": 100, "caption": "a tree"}]
    assert all(type(entry["image_id"]) is int for entry in entries)


def test_nocaps_submission_refuses_incomplete_or_non_numeric_ids(tmp_path):
    with pytest.raises(ValueError, match="1 missing"):
        write_nocaps_submission({"1": "a"}, tmp_path / "a.json", expected_ids=["1", "2"])
    with pytest.raises(ValueError, match="integers"):
        write_nocaps_submission({"abc": "a"}, tmp_path / "b.json")
    assert not (tmp_path / "a.json").exists()


def test_captions_from_cached_features_match_captions_from_images(standin_checkpoint):
    import numpy as np
    import torch

    from ituning.captioner import Captioner
    from ituning.decoding import DecodingConfig
    from tests.scene_images import shape_image

    captioner = Captioner.from_checkpoint(standin_checkpoint, device="cpu")
    images = {"5": shape_image("red", "circle"), "6": shape_image("blue", "square"),
              "7": shape_image("green", "circle")}
    with torch.inference_mode():
        cache = {key: captioner.vision(captioner.vision.preprocess(image)[None])[0].numpy().astype(np.float16)
                 for key, image in images.items()}  # (N, d) per image, as the feature cache stores them
    decoding = DecodingConfig(num_beams=2, max_length=6)
    one_by_one = generate_captions(captioner, cache, ["7", "5", "6"], decoding, batch_size=1)
    batched = generate_captions(captioner, cache, ["5", "6", "7"], decoding, batch_size=3)
    assert one_by_one == batched and list(batched) == ["5", "6", "7"]
    assert all(isinstance(caption, str) for caption in batched.values())


def test_score_command_reads_either_caption_format(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    submission = [{"image_id": int(key), "caption": text} for key, text in CANDIDATES.items()]
    (tmp_path / "captions.json").write_text(json.dumps(submission))
    (tmp_path / "references.json").write_text(json.dumps(REFERENCES))
    (tmp_path / "domains.json").write_text(json.dumps(DOMAINS))
    files = [str(tmp_path / name) for name in ("captions.json", "references.json")]
    result = CliRunner().invoke(app, ["score", *files, "--domains", str(tmp_path / "domains.json"),
                                      "--metrics", "CIDEr,BLEU-4", "--out", str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    expected = score_by_domain(CANDIDATES, REFERENCES, DOMAINS, metrics=["CIDEr", "BLEU-4"])
    assert json.loads((tmp_path / "scores.json").read_text()) == expected
    assert f"| CIDEr | {100 * expected['in-domain']['CIDEr']:.1f} |" in result.output
    (tmp_path / "captions.json").write_text(json.dumps({**CANDIDATES, "555": "no references"}))
    failed = CliRunner().invoke(app, ["score", *files, "--metrics", "CIDEr"])
    assert failed.exit_code == 2 and "no references" in failed.output


def test_ptb_tokenization_matches_pycocoevalcap_and_keeps_the_terminal_quiet(capfd):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from ituning.evaluation import ptb_tokenize

    texts = {"1": ["A man, riding a horse!", "Two dogs... on the 'beach'"], "2": ["It's a \"cat\" (grey)\nsleeping"],
             "3": ["Ünïcode café — déjà vu."], "4": [""]}
    reference = PTBTokenizer().tokenize({key: [{"caption": text} for text in group] for key, group in texts.items()})
    capfd.readouterr()
    assert ptb_tokenize(texts) == reference
    score_captions(CANDIDATES, REFERENCES, metrics=["BLEU-4", "CIDEr"])
    assert capfd.readouterr() == ("", "")  # the jar's "PTBTokenizer tokenized N tokens" lines go to the log
