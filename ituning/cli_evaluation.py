"""`ituning score`: caption metrics for a file of generated captions."""

import json
from pathlib import Path
from typing import Annotated

import typer


def read_captions(path: Path) -> dict[str, str]:
    """{image_id: caption}, or the submission format [{"image_id": ..., "caption": ...}]."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {str(entry["image_id"]): entry["caption"] for entry in data}
    return {str(key): value for key, value in data.items()}


def score(
    captions: Annotated[Path, typer.Argument(help="JSON {image_id: caption} or [{image_id, caption}]")],
    references: Annotated[Path, typer.Argument(help="JSON {image_id: [reference, ...]}")],
    domains: Annotated[Path | None, typer.Option(help="JSON {image_id: in-domain|near-domain|out-domain}")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. CIDEr,BLEU-4")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the scores here as JSON")] = None,
):
    """Print BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where installed) as JSON."""
    from ituning import evaluation

    chosen = metrics.split(",") if metrics else None
    try:
        candidates = read_captions(captions)
        refs = {str(key): value for key, value in json.loads(references.read_text()).items()}
        if domains is None:
            scores = evaluation.score_captions(candidates, refs, chosen)
        else:
            scores = evaluation.score_by_domain(candidates, refs, json.loads(domains.read_text()), chosen)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    if chosen is None and not evaluation.spice_available():
        typer.echo(evaluation.spice_install_instructions(), err=True)
    if out is not None:
        evaluation.save_json(scores, out)
    typer.echo(json.dumps(scores, indent=2))
    if domains is not None:
        typer.echo(evaluation.domain_table(scores))
