"""StableHLO export: forward and KV-cached decode reload with jax.export and match the model."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.interop.stablehlo_export import ExportedModel
from lmtrain.train.run_loader import load_workdir
from tests.unit.serve.test_serve import workdir  # noqa: F401 - the random-weight char model fixture


def test_forward_and_decode_round_trip(workdir, tmp_path):  # noqa: F811
    from lmtrain.cli import main

    out = str(tmp_path / "shlo")
    main(["export", "stablehlo", workdir, out])
    for name in (
        "forward.jax_exported",
        "decode.jax_exported",
        "params.safetensors",
        "manifest.json",
    ):
        assert os.path.exists(os.path.join(out, name))
    exported = ExportedModel(out)
    lm = load_workdir(workdir)
    apply = jax.jit(lm.model.apply)
    for shape in ((1, 5), (3, 11)):  # symbolic batch and length: one artefact, many shapes
        ids = np.random.RandomState(sum(shape)).randint(0, lm.model_cfg.vocab_size, shape)
        np.testing.assert_allclose(
            exported.forward(ids), np.asarray(apply({"params": lm.params}, ids)), atol=1e-5, rtol=0
        )
    prompt = [7, 8, 9, 10]
    want = generate(lm.model, lm.params, [prompt], SamplingParams(8, lm.tokenizer.eos_id)).tokens[0]
    got = exported.greedy(prompt, 8)
    assert got[: len(want)] == want


def test_missing_export_dir_is_a_clear_error(tmp_path):
    from lmtrain.errors import CheckpointError

    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        ExportedModel(str(tmp_path))


def test_inputs_past_the_context_are_refused(workdir, tmp_path):  # noqa: F811
    from lmtrain.errors import DataError
    from lmtrain.interop.stablehlo_export import export_stablehlo

    out = str(tmp_path / "shlo")
    export_stablehlo(workdir, out)
    exported = ExportedModel(out)
    ctx = exported.manifest["max_seq_len"]
    assert exported.forward(np.zeros((1, ctx), np.int32)).shape[:2] == (1, ctx)
    too_long = np.zeros((1, ctx + 1), np.int32)
    with pytest.raises(DataError) as e:
        exported.forward(too_long)
    assert str(e.value) == (
        f"tokens has length {ctx + 1}, past the model's context of {ctx} tokens; pass at most "
        f"{ctx} (keep the last {ctx} tokens of a longer text)"
    )
    with pytest.raises(DataError, match="the KV cache has length"):
        exported.empty_cache(1, ctx + 1)
    # The serialised function itself carries the bound, for callers without ExportedModel.
    with pytest.raises(ValueError):
        exported._forward.call(exported.params, too_long)
    cache = exported.empty_cache(1, ctx)
    with pytest.raises(DataError, match=f"positions has length {ctx + 1}"):
        exported.decode(cache, [[1]], [[ctx]], [[1]], ctx - 1)
