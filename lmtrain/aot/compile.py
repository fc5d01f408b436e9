"""Compile, without running, the programs ``lmtrain train`` runs, for a TPU topology.

The path is the trainer's own: :func:`lmtrain.train.loop.build_layout` (mesh over the topology's
devices, model, optimizer, ``state_shardings``), :func:`lmtrain.train.loop.step_functions`
(``make_train_step`` / ``make_eval_step`` with the config's objective, LoRA, microbatches, remat
and attention) and the sampler's ``compile_only`` mode. Arguments are ShapeDtypeStructs carrying
the shardings the real arrays would have, so nothing is allocated and no TPU is needed: libtpu's
compiler runs on the CPU host.

Each program gets a report: per-chip HBM (arguments split into params, optimizer state, batch
and frozen trees; outputs; temporaries; generated code; in total, the HBM XLA allocates, read
by :mod:`lmtrain.aot.hbm`) against the chip's capacity, the
compiler's FLOPs beside lmtrain's formula, collectives by kind, and the compile time. A program
that does not fit is reported, not raised: XLA's RESOURCE_EXHAUSTED message carries the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from lmtrain.aot import PROGRAMS, hbm, hlo
from lmtrain.aot.topology import Topology, get_topology
from lmtrain.data.finetune_data import PREFERENCE_OBJECTIVES
from lmtrain.data.pipeline import EXAMPLE_KEYS
from lmtrain.data.sft import FIELDS
from lmtrain.errors import ConfigError
from lmtrain.infer.sampling import SamplingParams, generate
from lmtrain.model.attention_kernels import target_platform
from lmtrain.train import (
    finetune,
    loop,  # the trainer's own setup and step functions
)
from lmtrain.train import flops as flops_lib
from lmtrain.train.compile_ahead import with_shardings
from lmtrain.train.config_check import validate
from lmtrain.train.step import stacked_shardings

GiB = 1024**3
# XLA:TPU flag for a compile that measures a program's need: when a program's live bytes exceed
# the chip's memory, XLA's rematerialization pass recomputes buffers until it fits or gives up,
# so the reported figure is XLA's squeeze (out-of-memory or not), not what the program as written
# keeps. Allowing only buffers of at least 1 PiB to be rematerialized turns the pass off; a
# program over the chip then fails with the bytes it needs in the message.
NO_XLA_REMAT = {"xla_tpu_rematerialization_min_size_in_bytes": str(1 << 50)}
_SAMPLE_PROMPT_LEN = 16  # the loop samples after a 16-token prompt when none is configured


@dataclasses.dataclass
class Programs:
    """What :func:`build_programs` returns: compile jobs plus what their reports need."""

    topology: Topology
    config: object
    mesh: object
    model_cfg: object
    # name -> (compile fn(extra XLA options) -> Compiled or {part: Compiled}, {group: args tree})
    jobs: dict


def _prepare_config(config, topology: Topology):
    cfg = copy.deepcopy(config)
    if cfg.model.vocab_size == 0:
        raise ConfigError(
            "config.model.vocab_size=0 (from the tokenizer): set the vocabulary size to compile, "
            "e.g. --config.model.vocab_size=128256"
        )
    with cfg.unlocked():
        if not (cfg.data.dir or cfg.data.path or cfg.data.train_file):
            cfg.data.dir = "<compiled>"  # no data is read; validation wants a source named
    finetune.adopt_init_from_model(cfg, print_fn=lambda *_: None)
    with target_platform(topology.devices[0].platform):  # kernels are checked for the target
        validate(cfg, topology.chips)
    return cfg


def batch_spec(cfg, rows: int, sharding) -> dict:
    """ShapeDtypeStructs of one global batch of ``rows`` rows for ``cfg.objective``'s loss."""
    t = cfg.data.seq_len
    if cfg.objective in PREFERENCE_OBJECTIVES:
        keys = [f"{side}_{f}" for side in ("chosen", "rejected") for f in FIELDS]
    else:
        keys = list(FIELDS if finetune.uses_records(cfg) else EXAMPLE_KEYS)
    spec = {k: jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=sharding) for k in keys}
    if cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
        for k in ("reference_chosen_logps", "reference_rejected_logps"):
            spec[k] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
    return spec


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def frozen_spec(cfg, setup) -> tuple[dict | None, dict | None, dict | None]:
    """(abstract frozen trees, their shardings, loss extras): what ``finetune.frozen_trees``
    passes the step, as shapes (LoRA base, DPO reference, distillation teacher)."""
    frozen, shardings, extras = {}, {}, None
    seq = cfg.data.seq_len
    if finetune.lora_enabled(cfg) or (cfg.objective == "dpo" and cfg.dpo.reference == "params"):
        key = "base" if finetune.lora_enabled(cfg) else "reference"
        abstract, sh = finetune.abstract_params(setup.model, seq, setup.mesh)
        frozen[key], shardings[key] = _abstract(abstract, sh), sh
    if cfg.objective == "distill":
        teacher = finetune.teacher_model(cfg)
        abstract, sh = finetune.abstract_params(teacher, seq, setup.mesh)
        frozen["teacher"], shardings["teacher"] = _abstract(abstract, sh), sh
        extras = {"teacher_model": teacher}
    if not frozen:
        return None, None, extras
    return frozen, shardings, extras


def build_programs(
    config, topology: str | Topology, programs=PROGRAMS, compiler_options: dict | None = None
) -> Programs:
    """The trainer's programs for ``config`` over ``topology``, ready to compile (the train step
    with ``compiler_options``, XLA flags for that compile, e.g. :data:`NO_XLA_REMAT`)."""
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ConfigError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
    cfg = _prepare_config(config, topo)
    with target_platform(topo.devices[0].platform):
        return _build(cfg, topo, programs, compiler_options)


def _build(cfg, topo: Topology, programs, compiler_options=None) -> Programs:
    jax.config.update("jax_threefry_partitionable", True)  # as loop.train sets it
    devices = list(topo.devices)[: cfg.mesh.num_devices or None]
    layout = loop.build_layout(cfg, devices)
    mesh, model_cfg, model, tx, schedule, transform, abstract, shardings, batch_sharding = layout
    setup = loop.Setup(cfg, mesh, model, model_cfg, None, "", tx, schedule, abstract, shardings,
                       batch_sharding, transform)  # fmt: skip
    frozen, frozen_shardings, extras = frozen_spec(cfg, setup)
    train_step, eval_step = loop.step_functions(setup, frozen_shardings, extras)
    state = with_shardings(abstract, shardings)
    jobs = {}
    if "train_step" in programs:
        n = loop_steps_per_call(cfg)
        batch = batch_spec(cfg, cfg.train.global_batch_size, batch_sharding)
        stacked = (
            batch
            if n == 1
            else {
                k: jax.ShapeDtypeStruct(
                    (n, *v.shape), v.dtype, sharding=stacked_shardings(v.sharding)
                )
                for k, v in batch.items()
            }
        )
        jobs["train_step"] = (
            lambda extra=None: train_step.compile_for(
                state, batch, frozen, n, {**(compiler_options or {}), **(extra or {})} or None
            ),
            {"params": state.params, "optimizer": state.opt_state, "batch": stacked,
             "frozen": frozen, "other": (state.step, state.rng)},
        )  # fmt: skip
    if "eval_step" in programs:
        rows = cfg.train.eval_batch_size or cfg.train.global_batch_size
        eval_batch = batch_spec(cfg, rows, batch_sharding)
        jobs["eval_step"] = (
            lambda extra=None: eval_step.compile_for(state.params, eval_batch, frozen, extra),
            {"params": state.params, "batch": eval_batch, "frozen": frozen},
        )
    if "sampler" in programs and cfg.objective != "reward":  # a reward model does not sample
        # prefill and decode take no XLA options: their memory is memory analysis's sum
        jobs["sampler"] = (lambda extra=None: _compile_sampler(cfg, setup), {})
    return Programs(topo, cfg, mesh, model_cfg, jobs)


def _compile_sampler(cfg, setup) -> dict:
    """Prefill + decode of ``train.samples`` rows on the mesh (as ``lmtrain generate`` runs)."""
    params, _ = finetune.abstract_params(setup.model, cfg.data.seq_len, setup.mesh)
    prompts = [[1] * _SAMPLE_PROMPT_LEN] * max(int(cfg.train.samples), 1)
    sp = SamplingParams(
        max(int(cfg.train.sample_tokens), 1), eos_id=0, temperature=0.8, top_k=40,
        past_context=True,
    )  # fmt: skip
    return generate(setup.model, params, prompts, sp, mesh=setup.mesh, compile_only=True)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def memory(compiled, allocated: int | None = None) -> dict[str, int]:
    """Per-chip bytes from XLA's memory analysis. ``total``: with ``allocated`` (the HBM of XLA's
    buffer assignment, :mod:`lmtrain.aot.hbm`) that plus the generated code, the figure XLA's
    fit check uses; without it, memory analysis's parts summed (``analysis_total``), which on
    TPU overstates it."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    # donated arguments share their buffers with the outputs they alias
    out["analysis_total"] = (
        out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
        + out["generated_code"]
    )  # fmt: skip
    out["total"] = out["analysis_total"]
    if allocated is not None:
        out["allocated"] = allocated
        out["total"] = allocated + out["generated_code"]
    peak = getattr(m, "peak_memory_in_bytes", 0)
    if peak:
        out["peak"] = int(peak)
    return out


def compiler_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def formula_flops(cfg, model_cfg, chips: int, program: str, steps: int = 1) -> float:
    """lmtrain's MFU formula (6N + attention per token; forward only: 2N) per chip and call."""
    per_token = flops_lib.flops_per_token(model_cfg, cfg.data.seq_len)
    sequences = 2 if cfg.objective in PREFERENCE_OBJECTIVES else 1
    if program == "train_step":
        rows = cfg.train.global_batch_size * steps  # one call runs ``steps`` steps
        return per_token * rows * cfg.data.seq_len * sequences / chips
    rows = cfg.train.eval_batch_size or cfg.train.global_batch_size
    return per_token / 3 * rows * cfg.data.seq_len * sequences / chips


def loop_steps_per_call(cfg) -> int:
    """Steps in the train call compiled (the loop's first dispatch)."""
    return loop.dispatch_size(0, loop.dispatch_group(cfg), cfg)


_NEEDED = [
    re.compile(r"Used ([\d.]+)([KMGT])i?B? of ([\d.]+)([KMGT])i?B? hbm"),
    re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
]
_UNIT = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def needed_bytes(error: str) -> float | None:
    """The bytes XLA's out-of-memory message says the program needs (None if not stated)."""
    for pattern in _NEEDED:
        m = pattern.search(error)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    return None


def _resource_error(e: Exception) -> str | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "Ran out of memory" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " ".join(lines[:3])[:600]
    return None


def _report_one(
    name, compiled, groups, cfg, model_cfg, topo, compile_s, hlo_dir, allocated=None
) -> dict:
    mem = memory(compiled, allocated)
    split = {g: per_chip_bytes(t) for g, t in groups.items() if t is not None}
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    capacity = topo.kind.memory_bytes
    report = {
        "program": name,
        "compile_s": compile_s,
        "memory_bytes": mem,
        "arguments_bytes": split,
        "capacity_bytes": capacity,
        "fits": mem["total"] <= capacity,
        "margin_bytes": capacity - mem["total"],
        "compiler_flops": compiler_flops(compiled),
        "collectives": hlo.collectives(text),
    }
    if name in ("train_step", "eval_step"):
        steps = loop_steps_per_call(cfg) if name == "train_step" else 1
        report["formula_flops"] = formula_flops(cfg, model_cfg, topo.chips, name, steps)
    return report


def compile_programs(
    config,
    topology: str | Topology,
    *,
    programs=PROGRAMS,
    hlo_dir: str = "",
    print_fn=None,
    compiler_options: dict | None = None,
) -> dict:
    """Compiles each program and returns the JSON-ready report (``fits`` over all programs)."""
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    # Every trace (the abstract init included) checks attention kernels against the target.
    with target_platform(topo.devices[0].platform):
        return _compile_programs(config, topo, programs, hlo_dir, print_fn, compiler_options)


def _compile_programs(
    config, topology: Topology, programs, hlo_dir: str, print_fn, compiler_options=None
) -> dict:
    built = build_programs(config, topology, programs, compiler_options)
    topo, cfg = built.topology, built.config
    reports = []
    for name, (job, groups) in built.jobs.items():
        if print_fn:
            print_fn(f"compiling {name} for {topo.name} ...")
        t0 = time.perf_counter()
        # on TPU the compile is dumped, to read the HBM XLA allocates (what its fit check uses)
        dumping = (
            hbm.dump_options() if topo.devices[0].platform == "tpu" else contextlib.nullcontext()
        )
        with dumping as dump:
            try:
                out = job(dump)
            except Exception as e:  # noqa: BLE001 - only XLA's out-of-memory is a result
                message = _resource_error(e)
                if message is None:
                    raise
                reports.append({"program": name, "compile_s": time.perf_counter() - t0,
                                "fits": False, "error": message,
                                "capacity_bytes": topo.kind.memory_bytes})  # fmt: skip
                continue
            allocated = hbm.allocated_bytes(dump) if dump else None
        dt = time.perf_counter() - t0
        parts = out if isinstance(out, dict) else {name: out}
        for part, compiled in parts.items():
            full = name if part == name else f"{name}.{part}"
            reports.append(
                _report_one(full, compiled, groups if part == name else {}, cfg, built.model_cfg,
                            topo, dt, hlo_dir, allocated if part == name else None)
            )  # fmt: skip
    return {
        "topology": topo.name,
        "chips": topo.chips,
        "device_kind": topo.devices[0].device_kind,
        "chip_memory_gib": topo.kind.memory_bytes / GiB,
        "mesh": dict(built.mesh.shape),
        "partitioner": "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd",
        "config": {
            "objective": cfg.objective,
            "remat": cfg.model.remat,
            "attention": cfg.model.attention,
            "global_batch": cfg.train.global_batch_size,
            "seq_len": cfg.data.seq_len,
            "microbatches": cfg.train.microbatches,
            "lora_rank": cfg.lora.rank,
            "params": built.model_cfg.param_count(),
        },
        "programs": reports,
        "fits": all(r["fits"] for r in reports),
    }
