"""Caption scores with the COCO caption evaluation code (pycocoevalcap), as the paper reports them.

BLEU-1..4, METEOR, ROUGE-L and CIDEr always; SPICE only where Stanford CoreNLP 3.6.0 is installed
next to pycocoevalcap's SPICE jar (pycocoevalcap would otherwise try to download it on first use).
Captions and references go through the PTB tokenizer first, as in the official COCO evaluation.
Values are pycocoevalcap's raw ones (CIDEr 1.17 is the paper's 117); presentation multiplies by 100.

CIDEr weighs n-grams by their document frequency over the references being scored, so a score
depends on which images are scored together: NoCaps domains are each scored on their own images,
as the NoCaps evaluation server does. NoCaps domains are not in its image-info files (val domains
may come with the images of nocaps_val_4500_captions.json; test domains only from the server):
images without a known domain count in "overall" alone, and a note says so.
"""

import json
import logging
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
OVERALL = "overall"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

log = logging.getLogger(__name__)


def spice_library_dir() -> Path:
    """Where pycocoevalcap's SPICE looks for the Stanford CoreNLP jars."""
    from importlib.util import find_spec

    spec = find_spec("pycocoevalcap.spice")  # locates the package without importing spice.py
    if spec is None or spec.origin is None:
        raise RuntimeError("pycocoevalcap is not installed")
    return Path(spec.origin).parent / "lib"


def spice_available() -> bool:
    """Whether SPICE can run without downloading anything (only looks at the files)."""
    return all((spice_library_dir() / jar).is_file() for jar in CORENLP_JARS)


def spice_install_instructions() -> str:
    return (
        "SPICE is left out: it needs Stanford CoreNLP 3.6.0, which is not installed. On a machine "
        "with internet access, download http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip, "
        f"take {CORENLP_JARS[0]} and {CORENLP_JARS[1]} from its top folder and copy both into "
        f"{spice_library_dir()}/ . SPICE runs on Java 8 or 11 (Java 17 and later are reported to fail "
        "with InaccessibleObjectException); put that java first on PATH when scoring."
    )


def _scorers(names: Iterable[str]) -> list[tuple[str, object]]:
    """(name, pycocoevalcap scorer) pairs; BLEU stands for its four orders."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    wanted = set(names)
    factories = {"BLEU": lambda: Bleu(4), "METEOR": Meteor, "ROUGE-L": Rouge, "CIDEr": Cider}
    if "SPICE" in wanted:
        from pycocoevalcap.spice.spice import Spice

        factories["SPICE"] = Spice
    if wanted & {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}:
        wanted.add("BLEU")
    return [(name, factory()) for name, factory in factories.items() if name in wanted]


def _resolve_metrics(metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return [name for name in METRICS if name != "SPICE" or spice_available()]
    metrics = list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(METRICS)}")
    if "SPICE" in metrics and not spice_available():
        raise RuntimeError(spice_install_instructions())
    return metrics


def _check_inputs(candidates: Mapping[str, str], references: Mapping[str, list[str]]) -> None:
    if not candidates:
        raise ValueError("no candidate captions to score")
    without_references = [key for key in candidates if not references.get(key)]
    if without_references:
        raise ValueError(f"{len(without_references)} images have no references, e.g. {without_references[:3]}")
    not_text = [key for key, caption in candidates.items() if not isinstance(caption, str)]
    if not_text:
        raise ValueError(f"candidates must be strings; not for {not_text[:3]}")


def tokenize(candidates: Mapping[str, str], references: Mapping[str, list[str]]):
    """PTB-tokenized (references, candidates) in pycocoevalcap's {id: [text, ...]} form."""
    _check_inputs(candidates, references)
    if shutil.which("java") is None:
        raise RuntimeError("the caption metrics need Java (the PTB tokenizer is a jar): install a JRE")
    gts = ptb_tokenize({key: list(references[key]) for key in candidates})
    res = ptb_tokenize({key: [text] for key, text in candidates.items()})
    return gts, res


def ptb_tokenize(texts: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer (the same jar, options and punctuation removal), with the jar's
    "PTBTokenizer tokenized N tokens" report sent to the log instead of the terminal, and its
    input file written to a temporary folder rather than into the installed package."""
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer

    keys = [key for key, captions in texts.items() for _ in captions]
    lines = "\n".join(text.replace("\n", " ") for captions in texts.values() for text in captions)
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="ituning-ptb-") as folder:
        source = Path(folder) / "captions.txt"
        source.write_bytes(lines.encode())
        result = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                 "-lowerCase", str(source)], capture_output=True, check=True)
    log.debug("%s", result.stderr.decode(errors="replace").strip())
    tokenized: dict[str, list[str]] = {}
    for key, line in zip(keys, result.stdout.decode().split("\n")):
        words = [word for word in line.rstrip().split(" ") if word not in ptbtokenizer.PUNCTUATIONS]
        tokenized.setdefault(key, []).append(" ".join(words))
    return tokenized


def _run_scorers(scorers, gts: dict, res: dict) -> dict[str, float]:
    scores = {}
    for name, scorer in scorers:
        try:
            quiet = {"verbose": 0} if name == "BLEU" else {}  # BLEU prints its counts otherwise
            value, _ = scorer.compute_score(gts, res, **quiet)
        except subprocess.CalledProcessError as error:
            if name != "SPICE":
                raise
            warnings.warn(f"SPICE failed ({error}); reporting the other metrics. {spice_install_instructions()}")
            continue
        if name == "BLEU":
            scores.update({f"BLEU-{order}": float(v) for order, v in enumerate(value, start=1)})
        else:
            scores[name] = float(value)
    return scores


def _close(scorers) -> None:
    """Stop METEOR's Java process now rather than whenever the scorer is collected."""
    for _, scorer in scorers:
        process = getattr(scorer, "meteor_p", None)
        if process is not None:
            process.kill()
            process.communicate()


def score_captions(candidates: Mapping[str, str], references: Mapping[str, list[str]],
                   metrics: Iterable[str] | None = None) -> dict[str, float]:
    """Scores of one candidate caption per image against that image's references.

    Keys: "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", and "SPICE" when Stanford CoreNLP
    is installed; `metrics` picks a subset (e.g. ["CIDEr"] for fast validation).
    """
    return score_by_group(candidates, references, {}, metrics)[OVERALL]


def score_by_group(candidates: Mapping[str, str], references: Mapping[str, list[str]],
                   groups: Mapping[str, str], metrics: Iterable[str] | None = None,
                   group_names: Iterable[str] = ()) -> dict[str, dict[str, float]]:
    """Scores per group of images (each group scored on its own images) and "overall".

    Tokenizes once and starts each scorer (METEOR's Java process) once for all groups."""
    names = _resolve_metrics(metrics)
    gts, res = tokenize(candidates, references)
    members = {name: [key for key in candidates if groups.get(key) == name] for name in group_names}
    scorers = _scorers(names)
    try:
        results = {
            name: _run_scorers(scorers, {k: gts[k] for k in keys}, {k: res[k] for k in keys})
            for name, keys in members.items()
            if keys
        }
        results[OVERALL] = _run_scorers(scorers, gts, res)
    finally:
        _close(scorers)
    return {name: {metric: results[name][metric] for metric in METRICS if metric in names and metric in results[name]}
            for name in [*members, OVERALL] if name in results}


def score_by_domain(candidates: Mapping[str, str], references: Mapping[str, list[str]],
                    domains: Mapping[str, str | None],
                    metrics: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """NoCaps-style scores: one entry per domain present ("in-domain", "near-domain",
    "out-domain", as the data names them), each scored on its own images, and "overall".

    An image without a domain (absent or None) counts in "overall" only; see missing_domains_note.
    Which domain names are valid is the data's business (storage/sources.py checks them on reading)."""
    known = {key: domains[key] for key in candidates if domains.get(key) is not None}
    return score_by_group(candidates, references, known, metrics, sorted(set(known.values())))


def missing_domains_note(image_ids: Iterable[str], domains: Mapping[str, str | None]) -> str | None:
    """What NoCaps scores of these images lack for want of domains; None when every image has one."""
    image_ids = list(image_ids)
    missing = sum(domains.get(key) is None for key in image_ids)
    if not missing:
        return None
    if missing < len(image_ids):
        return (f"NoCaps domain unknown for {missing} of {len(image_ids)} images: they count in the overall "
                "scores only, and the per-domain scores cover the other images")
    return (f"NoCaps domains unknown for all {missing} images: overall scores only (val domains come with the "
            "images of nocaps_val_4500_captions.json; test domains only from the evaluation server)")


def domain_table(scores: Mapping[str, Mapping[str, float]], metrics=("CIDEr", "SPICE")) -> str:
    """A Markdown table like the paper's NoCaps table: rows metrics x 100, columns the domains in
    name order (in-, near-, out-domain), then overall."""
    columns = [*sorted(name for name in scores if name != OVERALL), *([OVERALL] if OVERALL in scores else [])]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in metrics:
        if any(metric in scores[column] for column in columns):
            cells = [f"{100 * scores[c][metric]:.1f}" if metric in scores[c] else "-" for c in columns]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_nocaps_submission(captions: Mapping[str, str], path: str | Path,
                            expected_ids: Iterable[str] | None = None) -> Path:
    """The NoCaps evaluation server's upload: a JSON list of {"image_id": int, "caption": str}.

    With `expected_ids` (e.g. every NoCaps test image), a missing or extra image is an error."""
    if expected_ids is not None:
        expected = set(expected_ids)
        missing, extra = expected - captions.keys(), captions.keys() - expected
        if missing or extra:
            raise ValueError(f"captions do not match the split: {len(missing)} missing "
                             f"(e.g. {sorted(missing)[:3]}), {len(extra)} extra (e.g. {sorted(extra)[:3]})")
    try:
        entries = sorted((int(image_id), caption) for image_id, caption in captions.items())
    except ValueError as error:
        raise ValueError(f"NoCaps image ids are integers: {error}") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"image_id": image_id, "caption": caption} for image_id, caption in entries]))
    return path


def save_json(value, path: str | Path) -> Path:
    """Captions or scores as readable JSON (keys sorted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))
    return path
