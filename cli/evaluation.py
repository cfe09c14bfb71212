"""`ituning score`: caption metrics for a file of generated captions.

Candidates: the COCO results format [{"image_id", "caption"}, ...] (what the COCO and NoCaps
evaluation servers take) or {image_id: caption}. References: the COCO captions layout
{"images": [...], "annotations": [{"image_id", "caption", ...}]} (captions_val2014.json,
nocaps_val_4500_captions.json), a bare list of such annotations, or {image_id: [reference, ...]}.
Image ids are matched as text, so 184321, "184321" and "000000184321" are one image. References
whose images carry a NoCaps `domain` are scored by domain as well.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, on_one_line
from storage.jsonfields import load_json, required
from storage.sources import NOCAPS_DOMAINS, unknown_domains

CANDIDATE_FORMATS = '[{"image_id", "caption"}, ...] (COCO results) or {image_id: caption}'
REFERENCE_FORMATS = ('{"images", "annotations": [{"image_id", "caption"}]} (COCO captions), '
                     'or {image_id: [reference, ...]}')


class ScoreInputError(ValueError):
    """A candidates, references or domains file the score command cannot use; names the file."""


def image_key(value) -> str:
    """An image id as text; an integer and its decimal spelling (leading zeros or not) agree."""
    text = str(value).strip()
    return str(int(text)) if text.isascii() and text.isdigit() else text


def _annotations(entries: list, path: Path, where: str = "") -> list[tuple[str, str]]:
    """(image id, caption) of [{"image_id", "caption"}, ...] entries."""
    pairs = []
    for index, entry in enumerate(entries):
        label = f"{where}[{index}]"
        image_id = required(entry, "image_id", (int, str), path, label, ScoreInputError)
        pairs.append((image_key(image_id), required(entry, "caption", str, path, label, ScoreInputError)))
    return pairs


def _unique(pairs, path: Path) -> dict[str, str]:
    captions = {}
    for key, caption in pairs:
        if key in captions:
            raise ScoreInputError(f"{path}: image id {key} has more than one caption; score one per image")
        captions[key] = caption
    return captions


def read_captions(path: Path) -> dict[str, str]:
    """{image_id: caption} from either candidate format."""
    data = load_json(path)
    if isinstance(data, list):
        captions = _unique(_annotations(data, path), path)
    elif isinstance(data, dict) and all(isinstance(value, str) for value in data.values()):
        captions = _unique(((image_key(key), value) for key, value in data.items()), path)
    else:
        raise ScoreInputError(f"{path}: not a candidates file; expected {CANDIDATE_FORMATS}")
    if not captions:
        raise ScoreInputError(f"{path}: holds no captions")
    return captions


def read_references(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({image_id: [reference, ...]}, {image_id: domain} for images that name a NoCaps domain)."""
    data = load_json(path)
    domains = {}
    if isinstance(data, dict) and "annotations" in data:
        pairs = _annotations(required(data, "annotations", list, path, "", ScoreInputError), path, "annotations")
        domains = _domains_of_images(data, path)
    elif isinstance(data, list):
        pairs = _annotations(data, path)
    elif isinstance(data, dict) and all(isinstance(texts, list) and all(isinstance(text, str) for text in texts)
                                        for texts in data.values()):
        pairs = [(image_key(key), text) for key, texts in data.items() for text in texts]
    else:
        raise ScoreInputError(f"{path}: not a references file; expected {REFERENCE_FORMATS}")
    references: dict[str, list[str]] = {}
    for key, text in pairs:
        references.setdefault(key, []).append(text)
    if not references:
        raise ScoreInputError(f"{path}: holds no references")
    return references, domains


def _domains_of_images(data: dict, path: Path) -> dict[str, str]:
    images = data.get("images", [])
    if not isinstance(images, list):
        raise ScoreInputError(f"{path}: field images must be a list")
    return _known_domains({image_key(required(image, "id", (int, str), path, f"images[{index}]", ScoreInputError)):
                           image["domain"] for index, image in enumerate(images)
                           if isinstance(image, dict) and "domain" in image}, path)


def _known_domains(domains: dict[str, str], path: Path) -> dict[str, str]:
    wrong = unknown_domains(domains)
    if wrong:
        raise ScoreInputError(f"{path}: unknown domains {wrong}; expected {', '.join(NOCAPS_DOMAINS)}")
    return domains


def read_domains(path: Path) -> dict[str, str]:
    """{image_id: domain}, or the domains of the images of a COCO-layout file (NoCaps val captions)."""
    data = load_json(path)
    if isinstance(data, dict) and "images" in data:
        return _domains_of_images(data, path)
    if isinstance(data, dict):
        return _known_domains({image_key(key): value for key, value in data.items()}, path)
    raise ScoreInputError(f"{path}: not a domains file; expected {{image_id: domain}} or COCO-layout images "
                          "with a domain each")


def check_covered(candidates: dict, references: dict, captions_path: Path, references_path: Path) -> None:
    missing = [key for key in candidates if key not in references]
    if missing:
        raise ScoreInputError(f"{captions_path}: {len(missing)} of {len(candidates)} candidate image ids have no "
                              f"references in {references_path}, e.g. {missing[:3]}")


def score(
    captions: Annotated[Path, typer.Argument(help=f"candidates: {CANDIDATE_FORMATS}")],
    references: Annotated[Path, typer.Argument(
        help='references: COCO captions {"images", "annotations"} (captions_val2014.json, '
             "nocaps_val_4500_captions.json) or {image_id: list of references}")],
    domains: Annotated[Path | None, typer.Option(
        help="NoCaps domains: JSON {image_id: in-domain|near-domain|out-domain}, or a file whose images "
             "name theirs (nocaps_val_4500_captions.json); by default those of the references' images")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. CIDEr,BLEU-4")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the scores here as JSON")] = None,
):
    """Print BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where installed) as JSON; by NoCaps
    domain too when domains are known."""
    from ituning import evaluation
    from pipeline.evaluation import score_nocaps

    chosen = metrics.split(",") if metrics else None
    try:
        candidates = read_captions(captions)
        refs, found_domains = read_references(references)
        check_covered(candidates, refs, captions, references)
        by_domain = read_domains(domains) if domains is not None else found_domains or None
        if by_domain is None:
            scores = evaluation.score_captions(candidates, refs, chosen)
        else:
            scores = score_nocaps(candidates, refs, by_domain, chosen)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        fail(on_one_line(error))
    if chosen is None and not evaluation.spice_available():
        typer.echo(evaluation.spice_install_instructions(), err=True)
    note = evaluation.missing_domains_note(candidates, by_domain) if by_domain is not None else None
    if note:
        typer.echo(f"note: {note}", err=True)
    if out is not None:
        evaluation.save_json(scores, out)
    typer.echo(json.dumps(scores, indent=2))
    if by_domain is not None:
        typer.echo(evaluation.domain_table(scores))
