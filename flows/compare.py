"""`vitq compare`: the variants of the last N pipeline runs side by side, read back from MLflow.

Rows are grouped by variant, newest run first, so the same recipe's size, top-1 drop, SQNR,
latency and INT8 share across runs sit next to each other; `@alias` marks the registered version. A variant
a run did not remake (linked from its parent by `vitq.kept.<variant>`) is shown in that run, marked "kept".
"""

from __future__ import annotations

from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vitq.errors import VitqError

COLUMNS = ("variant", "run", "started (UTC)", "how", "size MB", "drop pts", "SQNR dB", "p50 ms", "int8 w", "pass",
           "alias")


def last_parent_runs(client: MlflowClient, experiment: str, n: int) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=20) if e.name != "Default"]
        raise VitqError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}; "
                        f"experiments there: {', '.join(names) or 'none (run `vitq run` first)'}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=max(50, 5 * n))
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags][:n]


def _aliases(client: MlflowClient, model: str) -> dict[str, str]:
    """run id -> '@alias' for the versions holding an alias of `model`."""
    try:
        rm = client.get_registered_model(model)
    except MlflowException:
        return {}
    out = {}
    for alias, version in (rm.aliases or {}).items():
        run_id = client.get_model_version(model, version).run_id
        out[run_id] = ",".join(filter(None, [out.get(run_id), f"@{alias}"]))
    return out


def _run_or_none(client: MlflowClient, run_id: str):
    """The run, or None when it was deleted since (a kept link to it then shows nothing)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def compare_rows(client: MlflowClient, experiment: str, n: int) -> list[tuple[str, ...]]:
    parents = last_parent_runs(client, experiment, n)
    if not parents:
        raise VitqError(f"experiment {experiment!r} has no finished pipeline run yet; run `vitq run` first")
    aliases = _aliases(client, experiment)
    rows: dict[str, list[tuple]] = {}
    for parent in parents:
        started = datetime.fromtimestamp(parent.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        # Variants this run did not remake are linked to the (earlier) run holding them: shown as this run's,
        # marked "kept".
        kept = {k.removeprefix("vitq.kept."): v for k, v in parent.data.tags.items() if k.startswith("vitq.kept.")}
        children = [*children, *(_run_or_none(client, run_id) for run_id in kept.values())]
        for c in filter(None, children):
            name = c.data.tags.get("mlflow.runName", c.info.run_id[:8])
            how = parent.data.tags.get("orchestration", "embedded") + (" (kept)" if kept.get(name) == c.info.run_id else "")
            m = c.data.metrics
            if "not_run" in c.data.tags:
                row = (name, parent.info.run_id[:8], started, how, *(["-"] * 5), "not run", "")
            else:
                row = (name, parent.info.run_id[:8], started, how, _fmt(m.get("size_mb"), ".3f"),
                       _fmt(m.get("top1_drop"), ".2f"), _fmt(m.get("sqnr_db"), ".1f"), _fmt(m.get("latency_ms_p50"), ".3f"),
                       _fmt(100 * m["int8_weight_fraction"] if "int8_weight_fraction" in m else None, ".0f") + "%",
                       "yes" if m.get("passed") else "NO", aliases.get(c.info.run_id, ""))
            rows.setdefault(name, []).append(row)
    return [r for name in sorted(rows) for r in rows[name]]


def compare_table(tracking_uri: str, experiment: str, n: int) -> str:
    """The table `vitq compare` prints (last `n` finished pipeline runs of `experiment`)."""
    if n < 1:
        raise VitqError(f"--runs {n} must be >= 1")
    rows = compare_rows(MlflowClient(tracking_uri=tracking_uri), experiment, n)
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = []
    for i, r in enumerate(table):
        if i > 1 and r[0] != table[i - 1][0]:
            lines.append("")
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
