"""The planner's per-chip estimate beside the TPU compiler's, for the README's table.

    python tools/plan_vs_compile.py --out plan_vs_compile.md            # every row
    python tools/plan_vs_compile.py --rows llama_8b:v5p:8x8x4:full      # chosen rows

Each row compiles the train step of a shipped config (splash attention, FSDP over the topology
unless the config sets a tensor axis) with ``lmtrain.aot.compile`` and compares the per-chip
total with ``lmtrain.plan``. With ``--depths a,b`` the step is compiled at two reduced depths
and the compiler's total extrapolated linearly to the config's depth (the layers are unrolled
and identical, so per-chip bytes grow by the same amount per layer); ``--depths full`` compiles
the whole model. A config that does not fit still gets the compiler's number: XLA's
out-of-memory message states the bytes the program needs.

libtpu must be installed (``pip install -e '.[tpu]'``); runs on a CPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtrain import plan as plan_lib  # noqa: E402
from lmtrain.aot.compile import compile_programs  # noqa: E402
from lmtrain.aot.topology import parse_name  # noqa: E402
from lmtrain.config import apply_overrides, load_config  # noqa: E402

GiB = 1024**3
REMATS = ("none", "full", "save_dots_and_attn_out")
TOPOLOGIES = {
    "llama_1b": ("v5e:4x4", "v5p:2x2x2"),
    "llama_8b": ("v5p:8x8x4", "v6e:16x16"),
    "llama_70b": ("v5p:8x16x16", "v6e:16x16"),
}
# Per config: overrides that make the shipped GPU configs TPU runs (the kernel is the only change).
TPU_OVERRIDES = ["model.attention=splash"]

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


def config_for(name: str, remat: str, extra: list[str], layers: int | None = None):
    cfg = load_config(os.path.join("configs", f"{name}.py"))
    over = [*TPU_OVERRIDES, f"model.remat={remat}", *extra]
    if layers is not None:
        over.append(f"model.n_layers={layers}")
    apply_overrides(cfg, over)
    return cfg


def compiled_total(cfg, topology: str) -> tuple[float, bool, float]:
    """(per-chip bytes, fits, seconds) of the compiled train step."""
    t0 = time.perf_counter()
    report = compile_programs(cfg, topology, programs=("train_step",))
    (train,) = report["programs"]
    dt = time.perf_counter() - t0
    if "error" in train:
        need = needed_bytes(train["error"])
        if need is None:
            raise RuntimeError(f"cannot read the needed bytes from: {train['error']}")
        return need, False, dt
    return float(train["memory_bytes"]["total"]), bool(train["fits"]), dt


def row(name: str, topology: str, remat: str, depths: str, extra: list[str]) -> dict:
    full = config_for(name, remat, extra)
    _, kind, chips = parse_name(topology)
    p = plan_lib.plan(full, kind, chips)
    est = p["per_device_gib"]["total"] * GiB
    n = full.model.n_layers
    if depths == "full":
        got, fits, secs = compiled_total(full, topology)
        how = "full"
    else:
        a, b = (int(x) for x in depths.split(","))
        ta, _, sa = compiled_total(config_for(name, remat, extra, a), topology)
        tb, _, sb = compiled_total(config_for(name, remat, extra, b), topology)
        got = ta + (tb - ta) / (b - a) * (n - a)
        fits, secs = got <= kind.memory_bytes, sa + sb
        how = f"layers {a},{b} -> {n}"
    return {
        "config": name, "topology": topology, "remat": remat, "planner_gib": est / GiB,
        "compiler_gib": got / GiB, "diff": (est - got) / got, "capacity_gib": kind.memory_bytes / GiB,
        "compiler_fits": fits, "planner_fits": p["fits"], "compile_s": secs, "method": how,
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    out = [
        "| config | topology | remat | planner GiB/chip | compiler GiB/chip | diff | fits (plan / compiler) | compiled as |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        out.append(
            f"| {r['config']} | {r['topology']} | {r['remat']} | {r['planner_gib']:.2f} | "
            f"{r['compiler_gib']:.2f} | {r['diff']:+.1%} | {yes(r['planner_fits'])} / "
            f"{yes(r['compiler_fits'])} | {r['method']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", help="config:topology:remat (default: the whole table)")
    ap.add_argument("--depths", default="2,4", help="'a,b' (extrapolate) or 'full'")
    ap.add_argument("--out", default="", help="markdown table (and .json beside it)")
    ap.add_argument("--override", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    if args.rows:
        todo = []
        for r in args.rows:
            name, gen, grid, remat = r.split(":")
            todo.append((name, f"{gen}:{grid}", remat))
    else:
        todo = [(n, t, r) for n, ts in TOPOLOGIES.items() for t in ts for r in REMATS]
    rows = []
    for name, topology, remat in todo:
        r = row(name, topology, remat, args.depths, args.override)
        rows.append(r)
        print(json.dumps(r), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
