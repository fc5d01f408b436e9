"""``lmtrain compile --config C --topology v5p:8x8x4``: compile the run's programs, report the fit.

Writes ``compile_report.json`` (and, with ``--hlo``, each program's HLO text) to ``--out``; a
program that does not fit in a chip's HBM makes the command exit with code 2.
"""

from __future__ import annotations

import json
import os

from lmtrain.aot import PROGRAMS
from lmtrain.errors import DoesNotFit

GiB = 1024**3


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _bytes(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def _temporaries(m: dict) -> int:
    """The temporaries' bytes: XLA's allocation where it was read, else memory analysis's."""
    if "allocated" not in m:
        return m["temporaries"]
    return m["allocated"] - m["arguments"] - m["outputs"] + m["aliased"]


def format_report(r: dict) -> str:
    c = r["config"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"topology    {r['topology']}: {r['chips']} x {r['device_kind']} "
        f"({r['chip_memory_gib']:.1f} GiB HBM each); mesh {mesh}; partitioner {r['partitioner']}",
        f"model       {c['params']:,} params | objective {c['objective']}"
        + (f" (LoRA rank {c['lora_rank']})" if c["lora_rank"] else "")
        + f" | remat {c['remat']} | attention {c['attention']} | batch {c['global_batch']} x "
        f"{c['seq_len']} in {c['microbatches']} microbatch(es)",
        "",
        f"{'program':<17}{'compile':>9}{'args':>9}{'outputs':>9}{'aliased':>9}{'temps':>9}"
        f"{'code':>8}{'total':>9}  {'of GiB':>7}  verdict",
    ]
    for p in r["programs"]:
        cap = p["capacity_bytes"]
        if "error" in p:
            lines.append(
                f"{p['program']:<17}{p['compile_s']:>8.1f}s{'':>53}  {cap / GiB:>7.1f}  "
                f"DOES NOT FIT: {p['error']}"
            )
            continue
        m = p["memory_bytes"]
        verdict = (
            f"FITS ({_gib(p['margin_bytes'])} GiB free)"
            if p["fits"]
            else f"DOES NOT FIT ({_gib(-p['margin_bytes'])} GiB over)"
        )
        lines.append(
            f"{p['program']:<17}{p['compile_s']:>8.1f}s{_gib(m['arguments']):>9}"
            f"{_gib(m['outputs']):>9}{_gib(m['aliased']):>9}{_gib(_temporaries(m)):>9}"
            f"{_gib(m['generated_code']):>8}{_gib(m['total']):>9}  {cap / GiB:>7.1f}  {verdict}"
        )
    measured = [p for p in r["programs"] if "allocated" in p.get("memory_bytes", {})]
    if measured:
        sums = ", ".join(
            f"{p['program']} {_gib(p['memory_bytes']['analysis_total'])}" for p in measured
        )
        lines.append(
            "temps, total: XLA's HBM allocations (plus code), the figures its fit check uses; "
            f"memory analysis's parts sum to more, GiB: {sums}"
        )
    lines.append("")
    for p in r["programs"]:
        if "error" in p:
            continue
        label = f"{p['program']:<17}"
        split = " | ".join(f"{k} {_gib(v)}" for k, v in p["arguments_bytes"].items() if v)
        if split:
            lines.append(f"{label}arguments GiB/chip: {split}")
            label = " " * 17
        flops = p.get("compiler_flops")
        if "formula_flops" in p and flops:
            lines.append(
                f"{label}FLOPs/chip: compiler {flops:.3e} | lmtrain formula "
                f"{p['formula_flops']:.3e} (ratio {flops / p['formula_flops']:.2f}; the compiler "
                "leaves Pallas kernels out)"
            )
            label = " " * 17
        coll = " | ".join(
            f"{k} {v['count']} ({_bytes(v['bytes'])})"
            for k, v in p["collectives"].items()
            if v["count"]
        )
        lines.append(f"{label}collectives: {coll or 'none'}")
    lines.append("verdict     " + ("FITS" if r["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)


def cmd_compile(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.aot.compile import compile_programs
    from lmtrain.config import load_config

    cfg = load_config(args.config, overrides)
    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    out = args.out
    report = compile_programs(
        cfg, args.topology, programs=programs, hlo_dir=out if args.hlo else "", print_fn=print
    )
    report["config_path"] = args.config
    report["overrides"] = list(overrides)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "compile_report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    print(f"report      {path}")
    if not report["fits"]:
        worst = [p for p in report["programs"] if not p["fits"]]
        raise DoesNotFit(
            f"{args.config} does not fit on {report['topology']}: "
            + "; ".join(
                f"{p['program']} "
                + (p["error"] if "error" in p
                   else f"needs {_gib(p['memory_bytes']['total'])} GiB per chip of "
                        f"{_gib(p['capacity_bytes'])} GiB")
                for p in worst
            )
            + " (shard more: a larger topology, fsdp/tensor axes, remat, microbatches)"
        )  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile the run's programs for a TPU topology (no TPU needed): does it fit?",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5p:8x8x4")
    p.add_argument("--out", default=".", help="directory for compile_report.json (and HLO)")
    p.add_argument("--hlo", action="store_true", help="also write each program's HLO text")
    p.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {PROGRAMS}"
    )
    p.set_defaults(fn=cmd_compile)
