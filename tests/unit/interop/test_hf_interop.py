"""Hugging Face import/export parity: logits of tiny random models match transformers' in float32."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from lmtrain.errors import CheckpointError, ConfigError  # noqa: E402
from lmtrain.interop.hf_export import export_hf  # noqa: E402
from lmtrain.interop.hf_import import import_hf  # noqa: E402
from lmtrain.model.transformer import Transformer  # noqa: E402
from lmtrain.train.run_loader import load_workdir  # noqa: E402
from tests.support.hf_tiny import VOCAB, hf_logits, save_model, trained_char_workdir  # noqa: E402

IDS = np.random.RandomState(0).randint(3, VOCAB, (2, 12))


def lmtrain_logits(workdir: str, ids) -> np.ndarray:
    lm = load_workdir(workdir)
    cfg = dataclasses.replace(lm.model_cfg, dtype="float32")
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": lm.params}, ids))


def load_hf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_import_export_round_trip_matches_transformers(arch, tmp_path):
    hf_dir, workdir, out = str(tmp_path / "hf"), str(tmp_path / "lm"), str(tmp_path / "out")
    model = save_model(arch, hf_dir)
    want = hf_logits(model, IDS)
    assert np.abs(want).max() > 1.0  # non-trivial logits, so 1e-4 is a real bound

    summary = import_hf(hf_dir, workdir)
    assert summary["architecture"] == arch
    got = lmtrain_logits(workdir, IDS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # The imported tokenizer encodes exactly as transformers' tokenizer does.
    lm = load_workdir(workdir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "it was the age of wisdom, it was"
    assert lm.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.eos_id == hf_tok.eos_token_id

    export_hf(workdir, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == arch
    back = load_hf(out)
    np.testing.assert_allclose(hf_logits(back, IDS), want, atol=1e-5, rtol=0)
    assert os.path.exists(os.path.join(out, "MODEL_CARD.md"))
    assert (
        transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == hf_tok(text)["input_ids"]
    )


def test_sharded_index_imports_and_exports_sharded(tmp_path):
    hf_dir = str(tmp_path / "hf")
    model = save_model("llama", hf_dir, max_shard_size="30KB")
    shards = [n for n in os.listdir(hf_dir) if n.endswith(".safetensors")]
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")) and len(shards) > 1
    import_hf(hf_dir, str(tmp_path / "lm"))
    np.testing.assert_allclose(
        lmtrain_logits(str(tmp_path / "lm"), IDS), hf_logits(model, IDS), atol=1e-4, rtol=0
    )

    out = str(tmp_path / "out")
    summary = export_hf(str(tmp_path / "lm"), out, max_shard_bytes=30_000)
    assert len(summary["files"]) > 1
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    np.testing.assert_allclose(
        hf_logits(load_hf(out), IDS), hf_logits(model, IDS), atol=1e-5, rtol=0
    )


def test_bfloat16_export_loads_with_bf16_rounding(tmp_path):
    hf_dir = str(tmp_path / "hf")
    model = save_model("qwen2", hf_dir)
    import_hf(hf_dir, str(tmp_path / "lm"))
    out = str(tmp_path / "out")
    export_hf(str(tmp_path / "lm"), out, dtype="bfloat16")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    w_orig = model.model.layers[0].mlp.up_proj.weight
    assert back.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, w_orig.to(torch.bfloat16))


def test_unsupported_architecture_lists_the_supported(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ConfigError) as e:
        import_hf(str(d), str(tmp_path / "lm"))
    msg = str(e.value)
    assert "gpt2" in msg
    for name in ("llama", "mistral", "qwen2", "gemma"):
        assert name in msg


def test_unsupported_rope_scaling_and_mismatched_checkpoint(tmp_path):
    hf_dir = tmp_path / "hf"
    save_model("llama", str(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama3"):
        import_hf(str(hf_dir), str(tmp_path / "lm"))
    cfg.pop("rope_scaling")
    cfg["num_hidden_layers"] = 1  # the checkpoint has 2 layers
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no place"):
        import_hf(str(hf_dir), str(tmp_path / "lm2"))


def test_cli_import_then_generate(tmp_path, capsys):
    from lmtrain.cli import main

    hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "lm")
    model = save_model("llama", hf_dir)
    main(["import", "hf", hf_dir, "--out", workdir, "--dtype", "float32"])
    assert json.loads(capsys.readouterr().out)["architecture"] == "llama"
    prompt = "it was the best of"
    main(
        [
            "generate",
            "--checkpoint",
            workdir,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--config.mesh.num_devices=1",
        ]
    )
    printed = capsys.readouterr().out.split("\n---")[0].strip()
    # Greedy continuation from transformers on the same prompt ids.
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert printed == tok.decode(gen[0], skip_special_tokens=True)


def test_trained_char_model_exports_with_tokenizer_and_card(tmp_path_factory, tmp_path):
    from lmtrain.data.tokenizer import load_tokenizer
    from lmtrain.eval.report import write_report

    workdir = trained_char_workdir(tmp_path_factory)
    eval_dir = tmp_path / "eval"
    write_report(
        eval_dir, {"title": "t", "tasks": {"heldout": {"metrics": {"accuracy": 0.375}, "n": 8}}}
    )
    # The card reads the newest report under the workdir.
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    os.replace(eval_dir / "report.json", os.path.join(workdir, "eval", "report.json"))
    out = str(tmp_path / "out")
    export_hf(workdir, out)
    ids = np.random.RandomState(1).randint(4, 30, (2, 16))
    np.testing.assert_allclose(
        hf_logits(load_hf(out), ids), lmtrain_logits(workdir, ids), atol=1e-4, rtol=0
    )
    ours = load_tokenizer(os.path.join(workdir, "data", "tokenizer"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "The quick\nbrown fox."
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    card = open(os.path.join(out, "MODEL_CARD.md")).read()
    assert "text.txt" in card  # data source from the data manifest
    assert "objective `lm`, 4 steps" in card
    assert "heldout (n=8): accuracy 0.375" in card
    assert "eval/loss at step 4" in card
    assert "## Intended use" in card and "## Limitations" in card


def test_lora_merge_and_peft_export(tmp_path):
    from safetensors.torch import load_file

    from lmtrain.config import base_config, to_json
    from lmtrain.interop.hf_export import export_peft
    from lmtrain.interop.workdir import save_params
    from lmtrain.model import lora

    hf_dir, base_wd = str(tmp_path / "hf"), str(tmp_path / "base")
    save_model("llama", hf_dir)
    import_hf(hf_dir, base_wd, hf_id="tiny-org/tiny-llama")
    base = load_workdir(base_wd)
    adapters = lora.init_adapters(base.params, 4, ("q", "o", "down"), jax.random.PRNGKey(1))
    adapters = jax.tree.map(
        lambda x: np.asarray(x) + 0.1 * np.random.RandomState(2).randn(*x.shape).astype(np.float32),
        adapters,
    )
    # A LoRA run's workdir: adapters only in the checkpoint, the base named by init_from.
    run = tmp_path / "lora_run"
    run.mkdir()
    cfg = base_config()
    cfg.update_from_flattened_dict(
        {
            "init_from": base_wd,
            "lora.rank": 4,
            "lora.alpha": 8.0,
            "lora.targets": ("q", "o", "down"),
        }
    )
    cfg.model.update(json.loads(open(os.path.join(base_wd, "config.json")).read())["model"])
    cfg.data.dir = base_wd
    (run / "config.json").write_text(to_json(cfg))
    save_params(str(run), adapters)

    merged_dir = str(tmp_path / "merged")
    assert export_hf(str(run), merged_dir)["merged_lora"]
    merged = lora.merge(lora.combine(base.params, adapters, 8.0))
    want = np.asarray(
        Transformer(dataclasses.replace(base.model_cfg, dtype="float32")).apply(
            {"params": merged}, IDS
        )
    )
    np.testing.assert_allclose(hf_logits(load_hf(merged_dir), IDS), want, atol=1e-4, rtol=0)

    peft_dir = str(tmp_path / "peft")
    info = export_peft(str(run), peft_dir)
    assert info["target_modules"] == ["down_proj", "o_proj", "q_proj"] and info["r"] == 4
    conf = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert conf["peft_type"] == "LORA" and conf["lora_alpha"] == 8.0
    assert conf["base_model_name_or_path"] == "tiny-org/tiny-llama"  # not the lmtrain workdir
    # Apply the adapters the way PEFT does (W + alpha/r * B @ A) to the exported base model.
    model = load_hf(export_hf(base_wd, str(tmp_path / "base_hf"))["out_dir"])
    tensors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 3 * 2
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace("lora_A", "lora_B")]
            target = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            modules[target].weight += (8.0 / 4) * (b @ a)
    np.testing.assert_allclose(hf_logits(model, IDS), want, atol=1e-4, rtol=0)


def test_export_of_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        export_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))
