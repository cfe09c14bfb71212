"""The pipeline's summary as markdown: one row per step with its metrics and its MLflow run."""

from pipeline.tracking import tracking_uri

HEADLINE = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE")


def run_link(run_id: str | None, uri: str) -> str:
    if not run_id:
        return "—"
    if uri.startswith("http"):
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}`"


def shown_value(value: int | float) -> str:
    """Counts as counts (steps 120), scores with three decimals (CIDEr 1.975)."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3f}"


def metrics_cell(metrics: dict) -> str:
    shown = [f"{name} {metrics[name]:.3f}" for name in HEADLINE if isinstance(metrics.get(name), (int, float))]
    shown += [f"{name} {shown_value(value)}" for name, value in metrics.items()
              if name not in HEADLINE and isinstance(value, (int, float))][: max(0, 3 - len(shown))]
    return ", ".join(shown) or "—"


def step_status(record: dict) -> str:
    if record.get("rebuilt"):
        return "rebuilt: shards damaged since they were written were encoded again"
    if record["cached"]:
        return "cached: reused, not re-run"
    if record.get("already_done"):
        return "ran: the stage was already trained on these inputs; its checkpoint reused"
    fallbacks = record.get("fallbacks", {})
    fell_back = [f"{name} fell back to the plain path ({reason})" for name, reason in fallbacks.items()]
    return "; ".join(["ran", *fell_back])


def step_rows(records: list[dict], uri: str) -> list[str]:
    rows = ["| step | status | metrics | MLflow run |", "|---|---|---|---|"]
    for record in records:
        status = step_status(record)
        rows.append(f"| {record['step']} | {status} | {metrics_cell(record.get('metrics', {}))} "
                    f"| {run_link(record.get('run_id'), uri)} |")
    return rows


def pipeline_markdown(title: str, records: list[dict], workspace, samples: list[list[str]] = (),
                      notes: list[str] = ()) -> str:
    uri = tracking_uri(workspace)
    lines = [f"# {title}", "", *step_rows(records, uri), ""]
    if samples:
        lines += ["## Sample captions", "", "| image | caption |", "|---|---|"]
        lines += [f"| {image_id} | {caption} |" for image_id, caption in samples]
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines.append(f"- MLflow tracking: `{uri}`")
    if not uri.startswith("http"):
        lines.append(f"- MLflow UI: `mlflow ui --backend-store-uri {uri}`")
    return "\n".join(lines) + "\n"
