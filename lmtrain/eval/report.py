"""Evaluation reports: ``report.json`` for machines, ``report.md`` + PNG plots for people.

``results`` passed to ``write_report`` is a plain dict; every section is optional::

    {"title": "...", "run": {"checkpoint": "...", "step": 1000},          # free-form metadata
     "tasks": {name: {"metrics": {m: v}, "n": N, "slices": {...}}},       # metrics.metric_by_slice
     "latency": {row: {column: v}}, "cost": {row: {column: v}},
     "safety": {"refusal": ..., "canaries": ..., "bias": ...},           # safety.* outputs
     "harness": {task: {metric: v, "n": N}}}                              # lm-eval (harness.py)

Plots use matplotlib's object API with the Agg canvas, so no GUI and no global backend switch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmtrain.errors import DataError

__all__ = [
    "compare_reports",
    "flatten_metrics",
    "read_loss_curves",
    "render_markdown",
    "write_report",
]

_MAX_SLICES_PLOTTED = 50


# ----------------------------------------------------------------------------- loading helpers


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        obj = obj.item() if getattr(obj, "ndim", 0) == 0 else obj.tolist()
        return _jsonable(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_loss_curves(metrics_jsonl: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read ``(step, loss)`` series ``train``, ``eval`` and ``eval_full`` from a run's JSONL.

    ``train`` is ``train/loss_avg`` (the mean over each log interval) where logged, else the
    single step's ``train/loss``; ``eval`` the periodic evals on one fixed subset of the split
    (``eval/loss``); ``eval_full`` the final eval over the whole split (``eval_full/loss``), kept
    apart because a subset and the whole split differ by more than training changes them late
    in a run. Lines without ``step`` are skipped. A truncated last line (a run still writing, or
    killed mid-write) is ignored; a malformed line elsewhere is an error. When a resumed run
    logs a step twice, the later value wins.
    """
    path = Path(metrics_jsonl)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataError(f"cannot read metrics file {path}: {e.strerror}") from e
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    curves: dict[str, dict[int, float]] = {"train": {}, "eval": {}, "eval_full": {}}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise DataError(
                f"{path}:{i + 1}: not valid JSON ({e.msg}); fix or delete the line"
            ) from e
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            continue
        for name in curves:
            value = row.get(f"{name}/loss")
            if name == "train" and _is_number(row.get("train/loss_avg")):
                value = row["train/loss_avg"]  # the mean over the log interval, when logged
            if _is_number(value):
                curves[name][int(row["step"])] = float(value)
    return {name: sorted(points.items()) for name, points in curves.items()}


def _loss_summary(curves: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    train, evals, full = curves["train"], curves["eval"], curves.get("eval_full", [])
    summary: dict[str, Any] = {"train_points": len(train), "eval_points": len(evals)}
    if train:
        summary["last_step"] = train[-1][0]
        summary["final_train_loss"] = train[-1][1]
    finite = [(s, v) for s, v in evals if math.isfinite(v)]
    if finite:  # min over the periodic (fixed-subset) evals only: their points compare
        step, best = min(finite, key=lambda p: p[1])
        summary.update(final_eval_loss=evals[-1][1], min_eval_loss=best, min_eval_loss_step=step)
    if full:  # the whole split, when the run logged it (older runs folded it into eval/loss)
        summary["final_eval_loss"] = full[-1][1]
        summary["final_eval_subset_loss"] = evals[-1][1] if evals else None
    return summary


# ----------------------------------------------------------------------------------- plotting


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


LOSS_SERIES = (
    ("train", "-", "train loss (mean over each log interval)"),
    ("eval", "o-", "validation loss (periodic, fixed subset)"),
    ("eval_full", "D", "validation loss (final, whole split)"),  # points only: never joined
)


def loss_figure(curves: Mapping[str, list[tuple[int, float]]]):
    """The loss plot: one line or marker set per series of ``read_loss_curves``."""
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    for name, style, label in LOSS_SERIES:
        if curves.get(name):
            steps, values = zip(*curves[name])
            ax.plot(steps, values, style, label=label, markersize=3 if name == "eval" else 6)
    ax.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _plot_loss(curves: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    loss_figure(curves).savefig(path, dpi=100)


def _plot_slices(task: str, field: str, slices: Mapping[str, Any], path: Path) -> bool:
    names = list(dict.fromkeys(m for s in slices.values() for m in s.get("metrics", {})))[:6]
    keys = list(slices)
    labels = [f"{k} (n={slices[k]['n']})" if "n" in slices[k] else k for k in keys]
    if not names:
        return False
    fig = _new_figure(4 * len(names), max(2.5, 1 + 0.3 * len(keys)))
    for i, metric in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        values = [slices[k].get("metrics", {}).get(metric) for k in keys]
        ax.barh(labels, [v if _is_number(v) else 0.0 for v in values], color="tab:blue")
        ax.invert_yaxis()
        ax.set(title=metric, xlabel=metric)
        if i == 0:
            ax.set_ylabel(field)
        else:
            ax.tick_params(labelleft=False)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{task} by {field}")
    fig.savefig(path, dpi=100)
    return True


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not _is_number(v):
        return str(v).replace("|", "\\|")
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(_fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def _grid(title: str, data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    cols = list(dict.fromkeys(c for row in data.values() for c in row))
    return [f"## {title}", ""] + _table(
        [""] + cols, [[r] + [data[r].get(c) for c in cols] for r in data]
    )


def _safety_md(safety: Mapping[str, Any]) -> list[str]:
    out = ["## Safety", ""]
    if "refusal" in safety:
        r = safety["refusal"]
        keys = ["precision", "recall", "f1", "over_refusal_rate", "refusal_rate"]
        out += ["### Refusals", ""] + _table(keys, [[r.get(k) for k in keys]])
    if "canaries" in safety:
        c = safety["canaries"]
        keys = ["num_canaries", "exact_leaks", "near_leaks", "exact_leak_rate", "near_leak_rate"]
        out += ["### Canary (PII) leaks", ""] + _table(keys, [[c.get(k) for k in keys]])
    if "bias" in safety:
        rows = [
            [
                axis,
                a.get("max_gap"),
                " > ".join(a.get("max_gap_groups", [])),
                a.get("max_template_gap"),
            ]
            for axis, a in safety["bias"].get("axes", {}).items()
        ]
        out += ["### Bias probe (score gap between groups)", ""]
        out += _table(["axis", "max gap", "highest > lowest", "max gap within a template"], rows)
    for key in sorted(set(safety) - {"refusal", "canaries", "bias"}):
        rows = [[k, v] for k, v in flatten_metrics({"safety": {key: safety[key]}}).items()]
        out += [f"### {key}", ""] + _table(["metric", "value"], rows)
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """The person-readable report for a ``report.json`` dict (plots are linked, not embedded)."""
    plots = report.get("plots", {})
    out = [f"# {report.get('title', 'Evaluation report')}", ""]
    out += [f"- **{k}**: {_fmt(v)}" for k, v in report.get("run", {}).items()] + [""]
    tasks = report.get("tasks", {})
    if tasks:
        rows = [
            [t, m, v, spec.get("n")]
            for t, spec in tasks.items()
            for m, v in spec.get("metrics", {}).items()
        ]
        out += ["## Summary", ""] + _table(["task", "metric", "value", "n"], rows)
    if report.get("harness"):
        rows = [
            [t, m, v, spec.get("n")]
            for t, spec in report["harness"].items()
            for m, v in spec.items()
            if m != "n"
        ]
        out += ["## lm-evaluation-harness", ""]
        out += ["lm-eval's own task definitions and metrics (harness_results.json).", ""]
        out += _table(["task", "metric", "value", "n"], rows)
    if "training" in report:
        out += ["## Training", ""]
        out += [f"- **{k}**: {_fmt(v)}" for k, v in report["training"].items()] + [""]
        if "loss" in plots:
            out += [f"![Training and validation loss]({plots['loss']})", ""]
    for task, spec in tasks.items():
        out += [f"## Task: {task}", ""]
        out += _table(["metric", "value"], [[m, v] for m, v in spec.get("metrics", {}).items()])
        for field, slices in spec.get("slices", {}).items():
            names = list(dict.fromkeys(m for s in slices.values() for m in s.get("metrics", {})))
            rows = [
                [value, s.get("n")] + [s.get("metrics", {}).get(m) for m in names]
                for value, s in slices.items()
            ]
            out += [f"### {task} by `{field}`", ""] + _table([field, "n"] + names, rows)
            if f"slices/{task}/{field}" in plots:
                out += [f"![{task} by {field}]({plots[f'slices/{task}/{field}']})", ""]
    for section in ("latency", "cost"):
        if report.get(section):
            out += _grid(section.capitalize(), report[section])
    if report.get("safety"):
        out += _safety_md(report["safety"])
    if report.get("notes"):
        out += ["## How these numbers are computed", ""]
        out += [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(out).rstrip() + "\n"


# -------------------------------------------------------------------------------- write/compare


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_report(
    out_dir: str | os.PathLike,
    results: Mapping[str, Any],
    metrics_jsonl: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``out_dir``; return the report.

    With ``metrics_jsonl`` the loss curves are plotted and summarised under ``training``.
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    report = _jsonable(dict(results))
    plots: dict[str, str] = {}
    if metrics_jsonl is not None:
        curves = read_loss_curves(metrics_jsonl)
        report["training"] = {**report.get("training", {}), **_loss_summary(curves)}
        if any(curves.values()):
            _plot_loss(curves, out / "plots" / "loss.png")
            plots["loss"] = "plots/loss.png"
    for i, (task, spec) in enumerate(report.get("tasks", {}).items()):
        for field, slices in spec.get("slices", {}).items():
            name = f"slices_{i:02d}_{_safe_name(task)}_{_safe_name(field)}.png"
            if 0 < len(slices) <= _MAX_SLICES_PLOTTED and _plot_slices(
                task, field, slices, out / "plots" / name
            ):
                plots[f"slices/{task}/{field}"] = f"plots/{name}"
    report["plots"] = plots
    _atomic_write(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    _atomic_write(out / "report.md", render_markdown(report))
    return report


# Keys that are counts or labels, not metrics worth comparing between runs.
_SKIP_KEYS = frozenset(
    "n tp fp fn tn group_means group_counts max_gap_groups leaked per_problem statuses"
    " skipped_ks train_points eval_points last_step min_eval_loss_step batch_size prompt_tokens"
    " new_tokens step generated_tokens scored_tokens tokens".split()
)


def _flatten(prefix: str, obj: Any, out: dict[str, float]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k not in _SKIP_KEYS and not str(k).startswith("num_"):
                _flatten(f"{prefix}/{k}", v, out)
    elif _is_number(obj):
        out[prefix] = float(obj)


def flatten_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Comparable scalars as ``section/.../name``: task metrics (not slices), training losses,
    latency, cost and safety numbers; counts and labels are left out."""
    out: dict[str, float] = {}
    for task, spec in report.get("tasks", {}).items():
        _flatten(f"tasks/{task}", spec.get("metrics", {}), out)
    for section in ("training", "latency", "cost", "safety", "harness"):
        _flatten(section, report.get(section, {}), out)
    return out


_NEUTRAL = ("refusal_rate",)
_HIGHER = ("per_s", "per_sec", "throughput", "mfu")
_LOWER = (
    "loss",
    "perplexity",
    "ppl",
    "bits_per_byte",
    "bpb",
    "latency",
    "_ms",
    "seconds",
    "time",
    "cost",
    "leak",
    "gap",
    "error",
    "over_refusal",
    "memory",
    "nll",
)


def _direction(key: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if neither (never flagged)."""
    name, key = key.rsplit("/", 1)[-1].lower(), key.lower()
    if name in _NEUTRAL:
        return 0
    if any(p in key for p in _HIGHER):
        return 1
    return -1 if any(p in key for p in _LOWER) else 1


def _load(report: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(report, Mapping):
        return report
    path = Path(report)
    path = path / "report.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"cannot read report {path}: {e}; pass a report.json or its directory"
        ) from e


def compare_reports(
    report_a: str | os.PathLike | Mapping[str, Any],
    report_b: str | os.PathLike | Mapping[str, Any],
    *,
    tolerance: float = 0.0,
    labels: tuple[str, str] = ("A", "B"),
) -> str:
    """Markdown table of every shared metric with ``B - A`` deltas; A is the baseline.

    A change counts as a regression when it moves the wrong way by more than ``tolerance``
    (absolute). Direction comes from the metric name: losses, latency, cost, leaks and gaps
    are lower-is-better, everything else higher-is-better.
    """
    a, b = flatten_metrics(_load(report_a)), flatten_metrics(_load(report_b))
    rows, regressions = [], 0
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            flag = f"only in {labels[0] if vb is None else labels[1]}"
            rows.append(f"| {key} | {_fmt(va)} | {_fmt(vb)} | — | {flag} |")
            continue
        delta, sign = vb - va, _direction(key)
        pct = f" ({delta / abs(va):+.1%})" if va else ""
        arrow = "↑" if delta > 0 else "↓" if delta < 0 else "="
        flag = ""
        if sign and abs(delta) > tolerance:
            worse = delta * sign < 0
            regressions += worse
            flag = f"{arrow} ⚠ regression" if worse else f"{arrow} improved"
        rows.append(f"| {key} | {_fmt(va)} | {_fmt(vb)} | {delta:+.4g}{pct} | {flag or arrow} |")
    head = [
        f"**{regressions} regression(s)** in {len(rows)} metrics ({labels[1]} vs {labels[0]}, "
        f"tolerance {tolerance:g}).",
        "",
        f"| metric | {labels[0]} | {labels[1]} | Δ | change |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"
