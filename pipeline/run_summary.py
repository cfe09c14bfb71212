"""The pipeline's summary as markdown: one row per stage with its metrics and its MLflow run."""

from pipeline.tracking import tracking_uri

HEADLINE = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE")


def run_link(run_id: str | None, uri: str) -> str:
    if not run_id:
        return "—"
    if uri.startswith("http"):
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}`"


def metrics_cell(metrics: dict) -> str:
    shown = [f"{name} {metrics[name]:.3f}" for name in HEADLINE if isinstance(metrics.get(name), (int, float))]
    shown += [f"{name} {value:.3f}" for name, value in metrics.items()
              if name not in HEADLINE and isinstance(value, (int, float))][: max(0, 3 - len(shown))]
    return ", ".join(shown) or "—"


def stage_rows(records: list[dict], uri: str) -> list[str]:
    rows = ["| stage | status | metrics | MLflow run |", "|---|---|---|---|"]
    for record in records:
        status = "cached: reused, not re-run" if record["cached"] else "ran"
        rows.append(f"| {record['stage']} | {status} | {metrics_cell(record.get('metrics', {}))} "
                    f"| {run_link(record.get('run_id'), uri)} |")
    return rows


def pipeline_markdown(title: str, records: list[dict], workspace, samples: list[list[str]] = (),
                      notes: list[str] = ()) -> str:
    uri = tracking_uri(workspace)
    lines = [f"# {title}", "", *stage_rows(records, uri), ""]
    if samples:
        lines += ["## Sample captions", "", "| image | caption |", "|---|---|"]
        lines += [f"| {image_id} | {caption} |" for image_id, caption in samples]
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines.append(f"- MLflow tracking: `{uri}`")
    if not uri.startswith("http"):
        lines.append(f"- MLflow UI: `mlflow ui --backend-store-uri {uri}`")
    return "\n".join(lines) + "\n"
