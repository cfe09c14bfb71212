"""`ituning score` on the field's own file formats, with the COCO caption evaluation code's example
results file (tests/data/coco-caption/, see tests/data/README.md) as a known answer."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.evaluation import read_captions
from cli.main import app
from ituning.evaluation import score_by_domain, score_captions, tokenize
from tests.test_evaluation import CANDIDATES, DOMAINS, REFERENCES

DATA = Path(__file__).parent / "data" / "coco-caption"
REAL_RESULTS = DATA / "captions_val2014_fakecap_results.json"
ITUNING = Path(sys.executable).parent / "ituning"
QUICK = ["CIDEr", "BLEU-4"]


def write(path: Path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


def coco_captions(references: dict, domains: dict | None = None) -> dict:
    """References in the layout of COCO's captions_val2014.json (and NoCaps' val captions file)."""
    domains = domains or {}
    images = [{"id": int(key), "file_name": f"{key}.jpg", **({"domain": domains[key]} if key in domains else {})}
              for key in references]
    annotations = [{"image_id": int(key), "id": 10 * int(key) + k, "caption": text}
                   for key, texts in references.items() for k, text in enumerate(texts)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def coco_results(candidates: dict) -> list:
    return [{"image_id": int(key), "caption": text} for key, text in candidates.items()]


def score(*arguments) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["score", *map(str, arguments)])
    return result.exit_code, result.stdout, result.stderr


def test_coco_references_and_results_are_scored(tmp_path):
    references = write(tmp_path / "captions_val2014.json", coco_captions(REFERENCES))
    for candidates in (coco_results(CANDIDATES), {f"{int(k):012d}": text for k, text in CANDIDATES.items()}):
        code, out, err = score(write(tmp_path / "results.json", candidates), references, "--metrics", ",".join(QUICK))
        assert code == 0, err
        assert json.loads(out) == score_captions(CANDIDATES, REFERENCES, QUICK)


def test_integer_and_text_ids_are_one_image(tmp_path):
    references = write(tmp_path / "references.json", REFERENCES)  # ids as text
    code, out, err = score(write(tmp_path / "results.json", coco_results(CANDIDATES)), references,
                           "--metrics", "CIDEr")
    assert code == 0, err
    assert json.loads(out) == score_captions(CANDIDATES, REFERENCES, ["CIDEr"])


def test_nocaps_val_captions_file_gives_scores_by_domain(tmp_path):
    references = write(tmp_path / "nocaps_val_4500_captions.json", coco_captions(REFERENCES, DOMAINS))
    candidates = write(tmp_path / "results.json", coco_results(CANDIDATES))
    code, out, err = score(candidates, references, "--metrics", "CIDEr")
    assert code == 0, err
    expected = score_by_domain(CANDIDATES, REFERENCES, DOMAINS, ["CIDEr"])
    assert json.loads(out.split("\n|", 1)[0]) == expected
    assert f"| CIDEr | {100 * expected['in-domain']['CIDEr']:.1f} |" in out and "note:" not in err
    partial = {key: domain for key, domain in DOMAINS.items() if domain != "out-domain"}
    references = write(tmp_path / "partial.json", coco_captions(REFERENCES, partial))
    code, out, err = score(candidates, references, "--metrics", "CIDEr")
    assert code == 0, err
    assert list(json.loads(out.split("\n|", 1)[0])) == ["in-domain", "near-domain", "overall"]
    assert "note: NoCaps domain unknown for 2 of 8 images" in err


@pytest.mark.parametrize("candidates, references, problem", [
    (coco_captions(REFERENCES), REFERENCES, r"candidates.json: not a candidates file; expected \[\{"),
    (coco_results(CANDIDATES), {"images": [{"id": 101}]}, r"references.json: not a references file"),
    (coco_results(CANDIDATES) + [{"image_id": 101, "caption": "again"}], REFERENCES,
     r"candidates.json: image id 101 has more than one caption"),
    ([{"image_id": 101}], REFERENCES, r"candidates.json: missing field \[0\].caption"),
    (coco_results(CANDIDATES), {k: v for k, v in REFERENCES.items() if k != "108"},
     r"candidates.json: 1 of 8 candidate image ids have no references in .*references.json, e.g. \['108'\]"),
    ([], REFERENCES, r"candidates.json: holds no captions"),
])
def test_bad_input_is_one_line_naming_file_and_problem(tmp_path, candidates, references, problem):
    code, out, err = score(write(tmp_path / "candidates.json", candidates),
                           write(tmp_path / "references.json", references), "--metrics", "CIDEr")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and re.match(f"error: .*{problem}", err), err


def test_unreadable_and_misnamed_files_are_one_line_errors(tmp_path):
    candidates = write(tmp_path / "results.json", coco_results(CANDIDATES))
    (tmp_path / "broken.json").write_text('[{"image_id": 1,')
    for references, problem in ((tmp_path / "broken.json", "broken.json: not valid JSON"),
                                (tmp_path / "absent.json", "absent.json")):
        code, _, err = score(candidates, references)
        assert code == 2 and err.startswith("error: ") and problem in err and err.count("\n") == 1
    wrong = write(tmp_path / "domains.json", {**DOMAINS, "108": "far-domain"})
    code, _, err = score(candidates, write(tmp_path / "references.json", REFERENCES), "--domains", wrong)
    assert code == 2 and "domains.json: unknown domains ['far-domain']" in err


# ---- the COCO caption evaluation code's example results file --------------------------------------


def real_references_of_184321() -> dict:
    refs = json.loads((DATA / "refs_184321_from_notebook.json").read_text())  # as the notebook printed them
    return coco_captions(refs)


def run_cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([str(ITUNING), "score", *map(str, arguments)], capture_output=True, text=True, timeout=300)


def test_real_results_file_reads_and_tokenizes_as_coco_printed_it():
    candidates = read_captions(REAL_RESULTS)
    assert len(candidates) == 1000 and candidates["184321"] == "train traveling down a track in front of a road"
    _, res = tokenize(candidates, {key: [text] for key, text in candidates.items()})
    lengths = [len(res[key][0].split()) for key in candidates]
    # The COCO code's BLEU printed 'testlen': 9893, 'guess': [9893, 8893, 7893, 6893] for these captions.
    assert [sum(max(0, n - k) for n in lengths) for k in range(4)] == [9893, 8893, 7893, 6893]


def test_real_results_known_answer_for_the_image_with_published_references(tmp_path):
    """Image 184321 of the real results file against its five references, through the installed
    command. Worked by hand after PTB tokenisation (lower case, no full stops): the candidate has
    10 tokens and a reference of 10, so no brevity penalty; clipped matches are 5/10 unigrams
    (train traveling down a a), 2/9 bigrams, 1/8 trigrams, 0/7 4-grams. ROUGE-L: the longest
    common subsequence is 3 with two references; best precision 3/10, best recall 3/8, beta 1.2."""
    entry = [item for item in json.loads(REAL_RESULTS.read_text()) if item["image_id"] == 184321]
    done = run_cli(write(tmp_path / "results.json", entry), write(tmp_path / "refs.json", real_references_of_184321()),
                   "--metrics", "BLEU-1,BLEU-2,BLEU-3,BLEU-4,ROUGE-L")
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    precision, recall = 3 / 10, 3 / 8
    expected = {"BLEU-1": 0.5, "BLEU-2": math.sqrt(0.5 * 2 / 9), "BLEU-3": (0.5 * 2 / 9 * 1 / 8) ** (1 / 3),
                "ROUGE-L": (1 + 1.2**2) * precision * recall / (recall + 1.2**2 * precision)}
    for metric, value in expected.items():
        assert scores[metric] == pytest.approx(value, rel=1e-6), metric
    assert scores["BLEU-4"] < 1e-3  # no 4-gram in common


def test_real_results_without_all_their_references_are_refused(tmp_path):
    done = run_cli(REAL_RESULTS, write(tmp_path / "refs.json", real_references_of_184321()), "--metrics", "CIDEr")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr == (f"error: {REAL_RESULTS}: 999 of 1000 candidate image ids have no references in "
                           f"{tmp_path / 'refs.json'}, e.g. ['404464', '380932', '565778']\n")


COCO_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
              "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ITUNING_CAPTIONS_VAL2014"),
                    reason="needs COCO's captions_val2014.json (32 MB): set ITUNING_CAPTIONS_VAL2014 to its path")
def test_real_results_score_what_the_coco_demo_printed(tmp_path):
    """The full known answer: the COCO demo's printed scores (3 decimals) for the real results file
    against the real captions_val2014.json."""
    expected = json.loads((DATA / "cocoEvalCapDemo_expected_scores.json").read_text())["scores"]
    done = run_cli(REAL_RESULTS, os.environ["ITUNING_CAPTIONS_VAL2014"], "--out", tmp_path / "scores.json")
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    for name, value in expected.items():
        if COCO_NAMES[name] in scores:  # SPICE only where Stanford CoreNLP is installed
            assert round(scores[COCO_NAMES[name]], 3) == pytest.approx(value, abs=1e-9), name
