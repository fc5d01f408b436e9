"""``MODEL_CARD.md`` written next to exported weights, from what the workdir records.

Every figure comes from a file: training data from the data manifest (``manifest.json`` of the
data dir), objectives and stages from ``config.json`` following ``init_from`` back to the first
run (or to an imported Hugging Face model), evaluation figures from the newest ``report.json``
under the workdir, plus ``final_metrics.json``. Missing sources are stated, never invented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from lmtrain.model.config import ModelConfig

MAX_STAGES = 8


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _data_dir(workdir: str, cfg: Mapping) -> str:
    data = cfg.get("data", {})
    return data.get("dir") or os.path.join(workdir, "data")


def data_sources(workdir: str, cfg: Mapping) -> list[str]:
    manifest = _read_json(os.path.join(_data_dir(workdir, cfg), "manifest.json"))
    if manifest is None:
        return []
    lines = []
    for src in manifest.get("sources", []):
        where = ", ".join(src.get("paths", [])) or (src.get("tfds") or {}).get("name", "")
        lines.append(
            f"{src.get('name', '?')} ({src.get('kind', '?')}, licence {src.get('licence', 'unknown')}): "
            f"{src.get('documents_read', '?')} documents read{f' from {where}' if where else ''}"
        )
    if "source" in manifest:
        lines.append(f"{manifest['source']} (sha256 {manifest.get('source_sha256', '?')[:16]}…)")
    for name, split in sorted(manifest.get("splits", {}).items()):
        tokens = split.get("tokens", split.get("num_tokens"))
        if tokens is not None:
            lines.append(f"split {name}: {tokens:,} tokens")
    return lines


def training_stages(workdir: str) -> list[str]:
    """One line per run, oldest first, following ``init_from``."""
    stages, seen, current = [], set(), os.path.abspath(workdir)
    while current and current not in seen and len(stages) < MAX_STAGES:
        seen.add(current)
        cfg = _read_json(os.path.join(current, "config.json"))
        source = _read_json(os.path.join(current, "hf_source", "config.json"))
        if source is not None:
            name = source.get("_name_or_path") or ", ".join(source.get("architectures") or [])
            stages.append(f"imported from Hugging Face: {name or source.get('model_type')}")
            break
        if cfg is None:
            stages.append(f"{current}: no config.json (stage unknown)")
            break
        objective = cfg.get("objective", "lm")
        steps = cfg.get("train", {}).get("steps", "?")
        lora = cfg.get("lora", {})
        extra = (
            f", LoRA rank {lora['rank']} on {', '.join(lora.get('targets', []))}"
            if lora.get("rank")
            else ""
        )
        data = cfg.get("data", {})
        where = data.get("train_file") or data.get("dir") or data.get("path") or "?"
        stages.append(f"objective `{objective}`, {steps} steps on {where}{extra}")
        current = cfg.get("init_from") or ""
    return stages[::-1]


def _latest_report(workdir: str) -> tuple[str, dict] | None:
    found = []
    for root, _, files in os.walk(workdir):
        if "report.json" in files and "checkpoints" not in root:
            path = os.path.join(root, "report.json")
            found.append((os.path.getmtime(path), path))
    if not found:
        return None
    path = max(found)[1]
    report = _read_json(path)
    return (path, report) if report is not None else None


def eval_figures(workdir: str) -> list[str]:
    lines = []
    latest = _latest_report(workdir)
    if latest is not None:
        path, report = latest
        lines.append(f"from `{os.path.relpath(path, workdir)}`:")
        for task, res in sorted(report.get("tasks", {}).items()):
            metrics = res.get("metrics", res) if isinstance(res, Mapping) else {}
            shown = ", ".join(
                f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, int | float)
            )
            n = f" (n={res['n']})" if isinstance(res, Mapping) and "n" in res else ""
            lines.append(f"{task}{n}: {shown or 'no numeric metrics'}")
    final = _read_json(os.path.join(workdir, "final_metrics.json"))
    if final:
        for key in ("eval/loss", "eval/perplexity"):
            if key in final:
                lines.append(f"{key} at step {final.get('step', '?')}: {final[key]:.4f}")
    return lines


def render(
    workdir: str, cfg: Mapping, model_cfg: ModelConfig, *, architecture: str, dtype: str
) -> str:
    def section(title: str, lines: list[str], empty: str) -> list[str]:
        return [f"## {title}", ""] + ([f"- {x}" for x in lines] if lines else [empty]) + [""]

    m = model_cfg
    out = [
        f"# Model card: {os.path.basename(os.path.abspath(workdir))}",
        "",
        f"A decoder-only transformer trained with lmtrain, exported as a Hugging Face `{architecture}` "
        f"checkpoint ({dtype}).",
        "",
        "## Model",
        "",
        f"- parameters: {m.param_count():,}",
        f"- layers {m.n_layers}, width {m.d_model}, heads {m.n_heads} (kv heads {m.n_kv_heads}, "
        f"head dim {m.kv_dim}), MLP {m.d_ff} ({m.mlp_activation})",
        f"- vocabulary {m.vocab_size}, context {m.max_seq_len} tokens, RoPE theta {m.rope_theta:g}",
        "",
    ]
    out += section(
        "Training data",
        data_sources(workdir, cfg),
        "No data manifest was found; the training data is not recorded here.",
    )
    out += section("Objectives and stages", training_stages(workdir), "Not recorded.")
    out += section(
        "Evaluation",
        eval_figures(workdir),
        "No evaluation report was found (run `lmtrain eval` before exporting).",
    )
    out += [
        "## Intended use",
        "",
        "Research and experimentation with language models: text continuation and, if fine-tuned "
        "for it, chat. Not for decisions about people, medical, legal or financial advice, or any "
        "use where an unverified generated text can cause harm.",
        "",
        "## Limitations",
        "",
        f"- Context is limited to {m.max_seq_len} tokens.",
        "- Generated text can be wrong, biased or offensive; the model has no notion of truth.",
        "- Behaviour outside the training data's language and domain is untested.",
        "- Figures above are those recorded in the workdir; they are not a safety evaluation unless "
        "the report includes one.",
        "",
    ]
    return "\n".join(out)


def write_model_card(
    out_dir: str,
    workdir: str,
    cfg: Mapping,
    model_cfg: ModelConfig,
    *,
    architecture: str,
    dtype: str,
) -> str:
    path = os.path.join(out_dir, "MODEL_CARD.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(workdir, cfg, model_cfg, architecture=architecture, dtype=dtype))
    return path
