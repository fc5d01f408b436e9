"""Ahead-of-time compiles for TPU topologies with libtpu on this CPU host (``lmtrain compile``).

The compiles use the trainer's own step functions over a topology's abstract devices; the
numbers checked come from XLA's memory analysis and the compiled HLO, not from lmtrain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lmtrain import cli
from lmtrain.aot import hlo
from lmtrain.aot.compile import NO_XLA_REMAT, build_programs, compile_programs, needed_bytes
from lmtrain.aot.topology import Topology, get_topology
from lmtrain.config import base_config
from lmtrain.errors import ConfigError
from lmtrain.plan import DEVICE_KINDS

REPO = str(Path(__file__).resolve().parents[3])

needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -e '.[tpu]')",
)

# A global batch no other dimension of the model equals, so its shapes can be found in the HLO.
GLOBAL_BATCH = 40


def small_config(**model):
    c = base_config()
    c.data.dir = "<compiled>"
    c.data.seq_len = 128
    c.model.update(vocab_size=384, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=96,
                   max_seq_len=128, dtype="bfloat16")  # fmt: skip
    c.model.update(**model)
    c.train.update(global_batch_size=GLOBAL_BATCH, samples=1, sample_tokens=4)
    c.mesh.shape = (1, -1, 1)  # FSDP over every chip
    return c


def _train_hlo(config, topology) -> str:
    built = build_programs(config, topology, programs=("train_step",))
    job, _ = built.jobs["train_step"]
    return job().as_text()


def _cpu_topology() -> Topology:
    return Topology("cpu:8", DEVICE_KINDS["cpu"], tuple(jax.devices()[:8]))


@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
def test_fsdp_keeps_activations_split_over_the_batch_on_the_cpu_mesh(partitioner):
    """Acceptance 0: under FSDP no buffer carries the global batch where the shard's belongs."""
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", partitioner == "shardy")
    try:
        text = _train_hlo(small_config(), _cpu_topology())
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)
    counts = hlo.batch_dims(text, GLOBAL_BATCH, GLOBAL_BATCH // 8)
    assert counts["global"] == 0, counts
    assert counts["shard"] > 50, counts  # the activations are there, with the shard's batch


@needs_libtpu
def test_fsdp_keeps_activations_split_over_the_batch_on_v5e():
    text = _train_hlo(small_config(), "v5e:2x2")
    counts = hlo.batch_dims(text, GLOBAL_BATCH, GLOBAL_BATCH // 4)
    assert counts["global"] == 0, counts
    assert counts["shard"] > 50, counts
    coll = hlo.collectives(text)
    assert coll["all-gather"]["count"] > 0  # FSDP gathers the weights ...
    assert coll["reduce-scatter"]["count"] + coll["all-reduce"]["count"] > 0  # ... and the grads


def _compile_cli(tmp_path, capsys, config_text: str, topology: str, *extra, code: int = 0):
    path = tmp_path / "cfg.py"
    path.write_text(config_text)
    argv = ["compile", "--config", str(path), "--topology", topology, "--out", str(tmp_path)]
    if code:
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, *extra])
        assert exc.value.code == code
    else:
        cli.main([*argv, *extra])
    captured = capsys.readouterr()
    with open(tmp_path / "compile_report.json") as f:
        return json.load(f), captured


SMALL = """
from lmtrain.config import base_config

def get_config():
    c = base_config()
    c.data.seq_len = 256
    c.model.update(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                   max_seq_len=256, dtype="bfloat16", attention="splash",
                   remat="save_dots_and_attn_out")
    c.train.update(global_batch_size=8, samples=2, sample_tokens=8)
    c.mesh.shape = (1, -1, 1)
    return c
"""


@needs_libtpu
def test_small_config_compiles_and_fits_on_v5e(tmp_path, capsys):
    report, out = _compile_cli(tmp_path, capsys, SMALL, "v5e:2x2", "--hlo")
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["device_kind"] == "TPU v5 lite" and report["fits"]
    names = [p["program"] for p in report["programs"]]
    assert names == ["train_step", "eval_step", "sampler.prefill", "sampler.decode"]
    capacity = 16 * 1024**3
    for p in report["programs"]:
        m = p["memory_bytes"]
        assert 0 < m["total"] < capacity and p["capacity_bytes"] == capacity
        assert p["margin_bytes"] == capacity - m["total"]
        assert os.path.getsize(tmp_path / f"{p['program']}.hlo.txt") > 1000
        # the steps' totals are XLA's HBM allocations plus code; the sampler's, memory analysis's
        if p["program"] in ("train_step", "eval_step"):
            assert m["total"] == m["allocated"] + m["generated_code"] > m["arguments"]
        else:
            assert "allocated" not in m and m["total"] == m["analysis_total"]
    assert "XLA's HBM allocations (plus code)" in out.out
    train = report["programs"][0]
    # float32 params and AdamW's two moments, each split 4 ways, are the step's arguments
    args = train["arguments_bytes"]
    # (plus AdamW's step count and the schedule's scalars)
    assert 0 <= args["optimizer"] - 2 * args["params"] <= 64 and args["params"] > 0
    assert train["memory_bytes"]["arguments"] >= args["params"] + args["optimizer"]
    coll = train["collectives"]
    assert coll["all-gather"]["count"] > 0 and coll["reduce-scatter"]["count"] > 0  # FSDP
    assert "FITS" in out.out and "train_step" in out.out and "collectives: all-gather" in out.out


DPO_LORA = """
from lmtrain.config import base_config

def get_config():
    c = base_config()
    c.objective = "dpo"
    c.data.train_file = "pairs.jsonl"  # not read: only its rows' shapes are compiled
    c.data.seq_len = 128
    c.model.update(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                   max_seq_len=128, dtype="bfloat16", attention="splash")
    c.lora.update(rank=8, targets=("q", "v"))
    c.train.update(global_batch_size=4, samples=0)
    c.mesh.shape = (1, 2, 2)  # FSDP 2 x tensor 2
    return c
"""


@needs_libtpu
def test_dpo_lora_step_with_tensor_sharding_on_v5p(tmp_path, capsys):
    report, _ = _compile_cli(
        tmp_path, capsys, DPO_LORA, "v5p:2x2x1", "--programs", "train_step", "--hlo"
    )
    assert report["device_kind"] == "TPU v5" and report["fits"]
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    (train,) = report["programs"]
    assert train["memory_bytes"]["total"] < 95 * 1024**3
    # LoRA: the frozen base is an argument, far larger than the trainable adapters
    args = train["arguments_bytes"]
    assert args["frozen"] > 10 * args["params"] > 0
    coll = train["collectives"]
    assert coll["all-gather"]["count"] > 0  # FSDP
    assert coll["all-reduce"]["count"] > 0  # tensor-parallel partial sums
    text = (tmp_path / "train_step.hlo.txt").read_text()
    # chosen and rejected rows, 4 of each, split over the 2 FSDP shards: 2 per chip
    assert hlo.batch_dims(text, 4, 2)["shard"] > 0


@needs_libtpu
def test_the_total_is_the_figure_xla_checks_against_the_chip():
    """XLA accepts a program under an HBM limit when its buffer assignment's HBM plus code is
    within it, and states that figure when refusing: the reported total is that figure, while
    memory analysis's parts can sum above a limit XLA accepted."""
    cfg = small_config(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1536,
                       vocab_size=8192, max_seq_len=1024)  # fmt: skip
    cfg.data.seq_len, cfg.train.global_batch_size = 1024, 16

    def train_step_under(limit_mib: int) -> dict:
        # XLA's remat pass off: under a tighter limit it would recompute to squeeze the program
        options = {**NO_XLA_REMAT, "xla_tpu_max_hbm_size_mib": str(limit_mib)}
        report = compile_programs(cfg, "v5e:2x2", programs=("train_step",),
                                  compiler_options=options)  # fmt: skip
        return report["programs"][0]

    MiB = 1024**2
    accepted = train_step_under(1000)
    m = accepted["memory_bytes"]
    assert "error" not in accepted and m["total"] == m["allocated"] + m["generated_code"]
    assert m["total"] <= 1000 * MiB < m["analysis_total"]
    refused = train_step_under(970)
    assert "error" in refused and "970.00M" in refused["error"]
    assert needed_bytes(refused["error"]) == pytest.approx(m["total"], rel=0.01)


@needs_libtpu
def test_oversized_config_does_not_fit_for_planner_and_compiler(tmp_path, capsys):
    over = ["--config.model.n_layers=2", "--config.model.attention=splash",
            "--config.mesh.shape=(1,-1,1)", "--config.train.global_batch_size=8",
            "--config.data.seq_len=2048"]  # fmt: skip
    cfg = os.path.join(REPO, "configs", "llama_70b.py")
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--config", cfg, "--devices", "tpu-v5e:4", *over])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit on 4 x tpu-v5e" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile", "--config", cfg, "--topology", "v5e:2x2", "--out", str(tmp_path),
                  "--programs", "train_step", *over])  # fmt: skip
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "does not fit on v5e:2x2" in captured.err and "train_step" in captured.err
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["fits"] is False


def test_missing_libtpu_names_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        get_topology("v5e:2x2")


def test_topology_names_are_checked():
    with pytest.raises(ConfigError, match="e.g. v5e:2x2"):
        get_topology("v5x:2x2")


def test_collectives_are_counted_by_kind_with_their_bytes():
    """TPU-style HLO: layouts with tiles, async pairs, combined tuples, a fused reduce-scatter."""
    text = """HloModule m

%all-reduce-scatter.4 (input_0: f32[512,256]) -> f32[128,256] {
  %all-reduce.80 = f32[512,256]{0,1:T(8,128)} all-reduce(%input_0), to_apply=%add
}

ENTRY %main (p: bf16[4,8]) -> f32[] {
  %all-gather-start.1 = (bf16[4,8]{1,0:T(8,128)(2,1)}, bf16[16,8]{1,0:T(8,128)(2,1)}) all-gather-start(bf16[4,8]{1,0} %p)
  %all-gather-done.1 = bf16[16,8]{1,0} all-gather-done(%all-gather-start.1)
  %all-reduce.2 = (f32[1024]{0:T(1024)}, f32[]{:T(128)}) all-reduce(%x, %w), to_apply=%add
  %fusion.176 = f32[128,256]{0,1:T(8,128)S(1)} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.4
  %all-reduce.71 = bf16[64,32]{1,0:T(8,128)(2,1)} all-reduce(%convert_dynamic-update-slice_fusion), channel_id=19, to_apply=%add.23
  ROOT %collective-permute.4 = s32[2,2]{1,0} collective-permute(s32[2,2]{1,0} %z)
  %add.5 = f32[] add(f32[] %a, f32[] %b)
}
"""
    c = hlo.collectives(text)
    assert c["all-gather"] == {"count": 2, "bytes": 16 * 8 * 2 + 64 * 32 * 2}  # one as all-reduce
    assert c["all-reduce"] == {"count": 1, "bytes": 4096 + 4}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 128 * 256 * 4}
    assert c["collective-permute"] == {"count": 1, "bytes": 16}
    assert c["all-to-all"] == {"count": 0, "bytes": 0}


@needs_libtpu
def test_a_cpu_run_without_tpus_starts_quietly_on_cpu():
    """libtpu installed, no TPU chips, JAX_PLATFORMS unset: the CLI picks CPU without warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
    code = (
        "from lmtrain.aot.host import prefer_cpu_without_tpu as p; print(p()); import jax;"
        "print(jax.devices()[0].platform)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in out.stderr, out.stderr


def test_kernels_are_checked_against_the_target_platform():
    """A TPU compile on a CPU host accepts splash; the host's own runs still refuse it."""
    from lmtrain.model import attention_kernels as ak

    with pytest.raises(ConfigError, match="Pallas TPU kernel"):
        ak.check_available("splash")  # this host: cpu
    with ak.target_platform("tpu"):
        ak.check_available("splash")
        with pytest.raises(ConfigError, match="NVIDIA GPU"):
            ak.check_available("cudnn")


@needs_libtpu
def test_a_tpu_mesh_in_context_makes_tpu_the_target():
    from lmtrain.model import attention_kernels as ak
    from lmtrain.model.sharding import make_mesh, mesh_rules

    mesh = make_mesh((1, -1, 1), get_topology("v5e:2x2").devices)
    with mesh_rules(mesh):
        ak.check_available("splash")


@needs_libtpu
def test_a_tensor_axis_that_does_not_factor_the_torus_gets_a_mesh():
    """llama_70b's (1, -1, 8) on v5p 16x16x16: jax.make_mesh finds no assignment of 8 to the
    16-long physical axes; the mesh splits a physical axis instead, every chip used once."""
    from lmtrain.model.sharding import make_mesh

    devices = get_topology("v5p:16x16x16").devices
    mesh = make_mesh((1, -1, 8), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 512, "tensor": 8}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_sampler_shardings_of_a_splash_model_are_the_xla_models():
    """The sampler traces params with a 1-token input, which the TPU kernels cannot tile."""
    import dataclasses

    from lmtrain.infer.sampling import params_shardings
    from lmtrain.model.config import ModelConfig
    from lmtrain.model.sharding import make_mesh
    from lmtrain.model.transformer import Transformer

    cfg = ModelConfig.from_config(small_config().model)
    mesh = make_mesh((1, -1, 1), jax.devices()[:8])
    xla = params_shardings(Transformer(cfg), mesh)
    splash = params_shardings(Transformer(dataclasses.replace(cfg, attention="splash")), mesh)
    assert jax.tree.map(lambda s: s.spec, splash) == jax.tree.map(lambda s: s.spec, xla)


@needs_libtpu
def test_plan_prints_the_compilers_numbers_beside_its_estimate(tmp_path, capsys):
    path = tmp_path / "cfg.py"
    path.write_text(SMALL)
    cli.main(["plan", "--config", str(path), "--devices", "tpu-v5e:4", "--compile"])
    out = capsys.readouterr().out
    assert "compiled    v5e:2x2 (shardy), train step:" in out
    row = [line for line in out.splitlines() if line.strip().startswith("total")][-1]
    planner, compiler = (float(x) for x in row.split()[1:3])
    planned = float(re.search(r"total\s+([\d.]+) GiB of", out).group(1))
    assert planner == pytest.approx(planned, abs=0.01) and compiler > 0
    assert "compiler: FITS in 16.0 GiB" in out


@needs_libtpu
def test_with_xla_remat_off_the_compiler_reports_the_programs_own_need():
    """XLA's remat pass squeezes a program over the chip's memory; ``NO_XLA_REMAT`` turns it off so
    that the compiler states the need of the program as written, here in closed form: the
    gradient of six chained ``tanh(h @ w)`` keeps six 8192² float32 activations, beside the two
    arguments and the output (9 × 256 MiB = 2,304 MiB)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lmtrain.aot.compile import NO_XLA_REMAT, needed_bytes

    def loss(x, w):
        total, h = 0.0, x
        for _ in range(6):
            h = jnp.tanh(h @ w)
            total = total + h.sum()
        return total

    mesh = Mesh(list(get_topology("v5e:2x2").devices)[:1], ("x",))
    arg = jax.ShapeDtypeStruct((8192, 8192), jnp.float32, sharding=NamedSharding(mesh, P()))
    lowered = jax.jit(jax.grad(loss, argnums=1)).lower(arg, arg)
    need = 9 * 8192 * 8192 * 4
    chip = {"xla_tpu_max_hbm_size_mib": str(need // 2**20 - 4)}  # a chip just below the need
    squeezed = lowered.compile(chip).memory_analysis()  # the pass recomputes: it fits
    assert squeezed.temp_size_in_bytes < 6 * 8192 * 8192 * 4
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
        lowered.compile({**chip, **NO_XLA_REMAT})
    assert needed_bytes(str(e.value)) == pytest.approx(need, rel=0.005)


@needs_libtpu
def test_offload_puts_the_saved_dots_in_host_memory():
    """The ``offload`` policy reaches XLA:TPU: the compiled step holds, in host memory, exactly
    the matmul outputs the planner counts as offloaded (qkv, o-proj and gate|up of each layer;
    shapes chosen without tile padding), where ``save_dots_and_attn_out`` holds none."""
    from lmtrain import plan
    from lmtrain.model.config import ModelConfig

    cfg = small_config(remat="offload", d_model=256, d_ff=512, n_heads=4, n_kv_heads=2,
                       max_seq_len=256)  # fmt: skip
    cfg.data.seq_len = 256
    built = build_programs(cfg, "v5e:2x2", programs=("train_step",))
    compiled = built.jobs["train_step"][0]()
    host = compiled.memory_analysis().host_temp_size_in_bytes
    rows = GLOBAL_BATCH // 4  # FSDP over the 4 chips
    want = plan.activation_bytes(ModelConfig.from_config(cfg.model), rows, 256, 1, "offload",
                                 cfg.model.attention)["host_offload"]  # fmt: skip
    assert host == want > 0
    assert re.search(r"bf16\[\d+,256,1024\]\{[^}]*S\(5\)\}", compiled.as_text())  # gate|up on host
