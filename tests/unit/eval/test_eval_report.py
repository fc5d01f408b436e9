"""Reports: JSONL loss parsing, written files read back, valid PNGs, comparison deltas."""

import json
import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from lmtrain.errors import DataError
from lmtrain.eval import metrics as M
from lmtrain.eval import report as R
from lmtrain.eval import safety as S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, lines, tail=""):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


@pytest.fixture
def metrics_jsonl(tmp_path):
    lines = [{"step": s, "train/loss": 4.0 - 0.3 * s, "lr": 1e-3} for s in range(10)]
    lines[4]["train/loss"] = 99.0  # overwritten by the resumed run's step 4 below
    lines += [
        {"step": 4, "train/loss": 2.8},
        {"step": 5, "eval/loss": 3.0},  # eval-only line
        {"step": 9, "train/loss": 1.3, "eval/loss": 2.5},
        {"step": 7, "lr": 1e-4},  # no loss: skipped
        {"train/loss": 0.1},  # no step: skipped
        {"step": 8, "train/loss": "nan?"},  # not a number: skipped
    ]
    return write_jsonl(tmp_path / "metrics.jsonl", lines, tail='{"step": 10, "train/lo')


def test_read_loss_curves(metrics_jsonl):
    curves = R.read_loss_curves(metrics_jsonl)
    expected_train = [(s, 4.0 - 0.3 * s) for s in range(10)]
    expected_train[4] = (4, 2.8)
    expected_train[9] = (9, 1.3)
    assert [s for s, _ in curves["train"]] == list(range(10))
    assert [v for _, v in curves["train"]] == pytest.approx([v for _, v in expected_train])
    assert curves["eval"] == [(5, 3.0), (9, 2.5)]


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"step": 0, "train/loss": 1.0}\n{"step": 1, oops\n{"step": 2, "train/loss": 0.5}\n'
    )
    with pytest.raises(DataError, match=r"m\.jsonl:2: not valid JSON"):
        R.read_loss_curves(path)
    with pytest.raises(DataError, match="cannot read metrics file"):
        R.read_loss_curves(tmp_path / "missing.jsonl")


def make_results():
    examples = [
        {"lang": "en", "em": 1.0, "f1": 1.0},
        {"lang": "en", "em": 0.0, "f1": 0.5},
        {"lang": "de", "em": 1.0, "f1": 1.0},
        {"lang": "fr", "em": 0.0, "f1": 0.25},
    ]
    qa = M.metric_by_slice(
        examples, {"exact_match": M.mean_of("em"), "f1": M.mean_of("f1")}, by="lang"
    )
    refusal = S.refusal_precision_recall(
        ["I'm sorry, I can't help with that.", "Sure, here it is."], [True, True]
    )
    bias = S.bias_report(
        [
            {"axis": "gender", "group": "man", "score": -1.0},
            {"axis": "gender", "group": "woman", "score": -1.5},
        ]
    )
    return {
        "title": "Nightly eval",
        "run": {"checkpoint": "runs/x/ckpt_1000", "step": 1000},
        "tasks": {"qa": qa, "lm": {"metrics": {"perplexity": np.float32(12.5), "weird": math.nan}}},
        "latency": {"generate": {"p50_ms": 41.25, "p99_ms": 97.5, "tokens_per_s": 1234.5}},
        "cost": {"eval": {"usd": 0.42}},
        "safety": {
            "refusal": refusal,
            "canaries": S.canary_leaks(["secret canary 123"], ["nothing"]),
            "bias": bias,
        },
    }


def test_write_report_files_read_back(tmp_path, metrics_jsonl):
    out = tmp_path / "report"
    returned = R.write_report(out, make_results(), str(metrics_jsonl))
    data = json.loads((out / "report.json").read_text())
    assert data == returned
    assert data["tasks"]["qa"]["metrics"] == {"exact_match": 0.5, "f1": 0.6875}
    assert data["tasks"]["lm"]["metrics"] == {"perplexity": 12.5, "weird": None}  # NaN -> null
    assert data["training"]["final_train_loss"] == pytest.approx(1.3)
    assert data["training"]["min_eval_loss"] == 2.5 and data["training"]["min_eval_loss_step"] == 9

    # Every plot exists, is a decodable PNG, and is linked from the markdown.
    md = (out / "report.md").read_text()
    assert set(data["plots"]) == {"loss", "slices/qa/lang"}
    for rel in data["plots"].values():
        png = out / rel
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 0
        assert mpimg.imread(png).ndim == 3
        assert f"]({rel})" in md

    # The numbers people look for are in the markdown.
    assert md.startswith("# Nightly eval")
    for text in [
        "| qa | exact_match | 0.5000 | 4 |",
        "| qa | f1 | 0.6875 | 4 |",
        "| en | 2 | 0.5000 | 0.7500 |",
        "| fr | 1 | 0.0000 | 0.2500 |",
        "| generate | 41.2500 | 97.5000 | 1,234.5 |",
        "| eval | 0.4200 |",
        "## Safety",
        "| 1.0000 | 0.5000 | 0.6667 |",
        "| gender | 0.5000 | man > woman |",
        "**final_train_loss**: 1.3000",
        "**checkpoint**: runs/x/ckpt_1000",
    ]:
        assert text in md, text


def test_write_report_without_metrics_or_optional_sections(tmp_path):
    R.write_report(tmp_path, {"tasks": {"t": {"metrics": {"accuracy": 0.25}}}})
    md = (tmp_path / "report.md").read_text()
    assert "| t | accuracy | 0.2500 | — |" in md
    assert "## Safety" not in md and "## Latency" not in md and "## Training" not in md
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == {}


def table_rows(markdown):
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "metric":
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_reports_deltas_and_flags(tmp_path):
    a = {
        "tasks": {
            "qa": {"metrics": {"exact_match": 0.5, "f1": 0.6}},
            "lm": {"metrics": {"loss": 2.0}},
        },
        "latency": {"gen": {"p50_ms": 40.0, "tokens_per_s": 100.0}},
        "safety": {"refusal": {"refusal_rate": 0.5, "tp": 3}},
    }
    b = {
        "tasks": {
            "qa": {"metrics": {"exact_match": 0.6, "f1": 0.6}},
            "lm": {"metrics": {"loss": 2.5}},
            "new": {"metrics": {"accuracy": 0.9}},
        },
        "latency": {"gen": {"p50_ms": 30.0, "tokens_per_s": 80.0}},
        "safety": {"refusal": {"refusal_rate": 0.9, "tp": 5}},
    }
    md = R.compare_reports(a, b)
    rows = table_rows(md)
    assert rows["tasks/qa/exact_match"][:3] == ["0.5000", "0.6000", "+0.1 (+20.0%)"]
    assert "improved" in rows["tasks/qa/exact_match"][3]
    assert (
        rows["tasks/lm/loss"][2] == "+0.5 (+25.0%)" and "⚠ regression" in rows["tasks/lm/loss"][3]
    )
    assert (
        rows["latency/gen/p50_ms"][2] == "-10 (-25.0%)"
        and "improved" in rows["latency/gen/p50_ms"][3]
    )
    assert rows["latency/gen/tokens_per_s"][2] == "-20 (-20.0%)"
    assert "regression" in rows["latency/gen/tokens_per_s"][3]
    assert rows["tasks/qa/f1"][2] == "+0 (+0.0%)" and rows["tasks/qa/f1"][3] == "="
    assert rows["safety/refusal/refusal_rate"][3] == "↑"  # neutral: never flagged
    assert rows["tasks/new/accuracy"] == ["—", "0.9000", "—", "only in B"]
    assert "safety/refusal/tp" not in rows  # counts are not compared
    assert md.startswith("**2 regression(s)** in 7 metrics")
    assert "0 regression(s)" in R.compare_reports(a, b, tolerance=100.0)


def test_compare_reports_from_written_dirs(tmp_path):
    R.write_report(tmp_path / "a", {"tasks": {"qa": {"metrics": {"f1": 0.5}}}})
    R.write_report(tmp_path / "b", {"tasks": {"qa": {"metrics": {"f1": 0.4}}}})
    md = R.compare_reports(tmp_path / "a", tmp_path / "b" / "report.json", labels=("base", "new"))
    row = table_rows(md)["tasks/qa/f1"]
    assert row[:2] == ["0.5000", "0.4000"] and row[2].startswith("-0.1 (-20.0%)")
    assert "regression" in row[3] and "| metric | base | new |" in md
    with pytest.raises(DataError, match="cannot read report"):
        R.compare_reports(tmp_path / "nope", tmp_path / "b")


def test_loss_plot_keeps_the_full_split_eval_apart_and_uses_interval_means(tmp_path):
    # What the training loop writes: per-interval mean loss beside the last step's loss,
    # periodic evals on one fixed subset, and the final whole-split eval as eval_full/loss.
    lines = [
        {"step": 50, "train/loss": 2.9, "train/loss_avg": 3.2},
        {"step": 100, "train/loss": 1.2, "train/loss_avg": 2.1},  # one lucky batch
        {"step": 100, "eval/loss": 1.70},
        {"step": 150, "train/loss": 1.9, "train/loss_avg": 1.8},
        {"step": 200, "train/loss": 1.5, "train/loss_avg": 1.6},
        {"step": 200, "eval/loss": 1.60, "eval_full/loss": 1.65},
    ]
    curves = R.read_loss_curves(write_jsonl(tmp_path / "metrics.jsonl", lines))
    assert curves["train"] == [(50, 3.2), (100, 2.1), (150, 1.8), (200, 1.6)]
    assert curves["eval"] == [(100, 1.70), (200, 1.60)]  # the subset series keeps going down
    assert curves["eval_full"] == [(200, 1.65)]

    ax = R.loss_figure(curves).axes[0]
    plotted = {line.get_label(): line for line in ax.get_lines()}
    train = plotted["train loss (mean over each log interval)"]
    subset = plotted["validation loss (periodic, fixed subset)"]
    full = plotted["validation loss (final, whole split)"]
    assert list(train.get_ydata()) == [3.2, 2.1, 1.8, 1.6]
    assert list(subset.get_ydata()) == [1.70, 1.60]
    assert list(full.get_xdata()) == [200] and full.get_linestyle() == "None"  # not joined

    report = R.write_report(tmp_path / "rep", {"title": "t"}, tmp_path / "metrics.jsonl")
    assert report["training"]["final_eval_loss"] == 1.65  # the whole split
    assert report["training"]["final_eval_subset_loss"] == 1.60
    assert report["training"]["min_eval_loss"] == 1.60  # over comparable (subset) points only
    assert (tmp_path / "rep" / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
