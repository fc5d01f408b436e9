"""The planner's per-chip estimate beside the TPU compiler's, for the README's table.

    python tools/plan_vs_compile.py --out docs/plan_vs_compile.md      # every row (resumable)
    python tools/plan_vs_compile.py --rows llama_8b:v5p:8x8x4:full      # chosen rows
    python tools/plan_vs_compile.py --from-json docs/plan_vs_compile.json --out docs/plan_vs_compile.md

Each row compiles the train step of a shipped config (splash attention; the config's own mesh,
so FSDP over the topology with the config's tensor axis) with ``lmtrain.aot.compile`` and
compares the per-chip total with ``lmtrain.plan``'s estimate of it. ``--depths full`` (the
default) compiles the whole model. ``--depths a,b`` compiles two reduced depths and extrapolates
linearly to the config's depth; it is cheaper but can be far off: XLA's schedule of a shallow
program, with most of the chip free, does not grow per layer the way the full-depth one does
(docs/performance.md has a measured case), so prefer full depth for the table.
The compiler's figure is the one XLA checks against the chip: the HBM of its buffer assignment
plus the generated code (``lmtrain.aot.hbm``), not memory analysis's sum, which on TPU is larger.
A config that does not fit still gets the compiler's number: XLA's out-of-memory message states
the bytes the program needs (its allocations, with the code when only that tips it over). ``--import-report`` takes a row's numbers from a
``compile_report.json`` that ``lmtrain compile --programs train_step`` wrote for it.

The compiler's numbers are kept in the JSON beside ``--out`` (one entry per row and depth) and
reused on the next run, so an interrupted run resumes and ``--from-json`` recomputes the
planner's column against saved numbers without compiling (the planner is cheap; the compiler is
not). The planner is also evaluated at the compiled depths, so the JSON shows per-layer slopes
and fixed parts of both.

libtpu must be installed (``pip install -e '.[tpu]'``); runs on a CPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtrain.aot.host import prefer_cpu_without_tpu  # noqa: E402

prefer_cpu_without_tpu()  # before jax starts a backend: the host's own runs are CPU ones

from lmtrain import plan as plan_lib  # noqa: E402
from lmtrain.aot.compile import needed_bytes  # noqa: E402
from lmtrain.aot.topology import parse_name  # noqa: E402
from lmtrain.config import apply_overrides, load_config  # noqa: E402

GiB = 1024**3
REMATS = ("none", "full", "save_dots_and_attn_out", "offload")
TOPOLOGIES = {
    "llama_1b": ("v5e:4x4", "v6e:4x4"),
    "llama_8b": ("v5p:8x8x4", "v6e:16x16"),
    "llama_70b": ("v5p:8x16x16", "v5p:16x16x16"),  # no v6e slice (256 chips) holds it
}
# Rows with host offload: one topology per config (the policy is the same on every one).
OFFLOAD_ON = {"llama_1b": "v5e:4x4", "llama_8b": "v5p:8x8x4", "llama_70b": "v5p:8x16x16"}
# Per config: overrides that make the shipped GPU configs TPU runs (the kernel is the only change).
TPU_OVERRIDES = ["model.attention=splash"]


def config_for(name: str, remat: str, extra: list[str], layers: int | None = None):
    cfg = load_config(os.path.join("configs", f"{name}.py"))
    over = [*TPU_OVERRIDES, f"model.remat={remat}", *extra]
    if layers is not None:
        over.append(f"model.n_layers={layers}")
    apply_overrides(cfg, over)
    return cfg


def compile_once(cfg, topology: str, no_xla_remat: bool = False) -> dict:
    """The compiled train step's per-chip bytes (total and parts) and compile seconds."""
    from lmtrain.aot.compile import NO_XLA_REMAT, compile_programs

    t0 = time.perf_counter()
    options = NO_XLA_REMAT if no_xla_remat else None
    report = compile_programs(cfg, topology, programs=("train_step",), compiler_options=options)
    out = from_report(report)
    out["compile_s"] = time.perf_counter() - t0
    return out


def from_report(report: dict) -> dict:
    """A row's compiler numbers from ``lmtrain compile``'s report (its train step)."""
    (train,) = [p for p in report["programs"] if p["program"] == "train_step"]
    out = {"compile_s": train["compile_s"]}
    if "error" in train:
        need = needed_bytes(train["error"])
        if need is None:
            raise RuntimeError(f"cannot read the needed bytes from: {train['error']}")
        out.update(total=need, fits=False, error=train["error"])
    else:
        out.update(total=float(train["memory_bytes"]["total"]), fits=bool(train["fits"]),
                   memory_bytes=train["memory_bytes"], arguments_bytes=train["arguments_bytes"])  # fmt: skip
    return out


def import_report(spec: str, extra: list[str]) -> tuple[str, dict]:
    """``config:gen:grid:remat=compile_report.json`` → (cache key, numbers), checked to match."""
    row_spec, _, path = spec.partition("=")
    name, gen, grid, remat = row_spec.split(":")
    with open(path) as f:
        report = json.load(f)
    cfg = config_for(name, remat, extra)
    want = {"topology": f"{gen}:{grid}", "remat": remat, "attention": cfg.model.attention,
            "global_batch": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len,
            "microbatches": cfg.train.microbatches}  # fmt: skip
    got = {**report["config"], "topology": report["topology"]}
    wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if wrong or report["config"]["params"] != cfg_params(cfg):
        raise SystemExit(f"{path} is not the compile of {row_spec} (report vs row: {wrong})")
    return key(name, f"{gen}:{grid}", remat, "full"), {
        **from_report(report),
        "source": "imported lmtrain compile report",
    }


def cfg_params(cfg) -> int:
    from lmtrain.model.config import ModelConfig

    return ModelConfig.from_config(cfg.model).param_count()


def current(cache: dict) -> dict:
    """The kept compiles whose figure is XLA's HBM allocations: a compile kept before those were
    read (memory analysis's sum, which overstates them) is compiled again."""
    return {
        k: c for k, c in cache.items() if "error" in c or "allocated" in c.get("memory_bytes", {})
    }


def key(name: str, topology: str, remat: str, depth: str) -> str:
    return f"{name}:{topology}:{remat}:{depth}"


NO_REMAT_DEPTH = "full+no_xla_remat"  # the cache's depth for a full compile with XLA's remat off


def compiled(cache: dict, name, topology, remat, depth, extra, compile_ok: bool, save) -> dict:
    k = key(name, topology, remat, str(depth))
    if k not in cache:
        if not compile_ok:
            raise LookupError(f"{k}: no compiler numbers in the JSON (run without --from-json)")
        layers = None if depth in ("full", NO_REMAT_DEPTH) else int(depth)
        cfg = config_for(name, remat, extra, layers)
        cache[k] = compile_once(cfg, topology, no_xla_remat=depth == NO_REMAT_DEPTH)
        save()
    return cache[k]


def planned(name, topology, remat, extra, layers=None) -> dict:
    _, kind, chips = parse_name(topology)
    return plan_lib.plan(config_for(name, remat, extra, layers), kind, chips)


def over_the_chip(p: dict, kind, default: dict | None) -> bool:
    """Whether a row's program presses on the chip's memory, in the planner's need or in the
    compiler's default figure: there XLA's own rematerialization may have changed the program."""
    return p["per_device_gib"]["total"] * GiB > kind.memory_bytes or (
        default is not None and default["total"] > kind.memory_bytes
    )


def row(name, topology, remat, depths, extra, cache, compile_ok, save, remat_off=True) -> dict:
    """One table row. The compiler's verdict is XLA's own: whether the default compile (its
    remat pass on, as ``lmtrain train`` compiles) was accepted for the chip. Its memory
    analysis can sum above the chip for a program XLA accepts (the temporaries' allocation
    grows with free memory), so that sum is not the verdict."""
    _, kind, _ = parse_name(topology)
    p = planned(name, topology, remat, extra)
    n = load_config(os.path.join("configs", f"{name}.py")).model.n_layers
    detail, fits = {}, None
    if not compile_ok and key(name, topology, remat, "full") in cache:
        depths = "full"  # a full-depth compile is the better number where one was kept
    default = cache.get(key(name, topology, remat, "full"))
    over = over_the_chip(p, kind, default)
    off_kept = key(name, topology, remat, NO_REMAT_DEPTH) in cache
    need_kept = (compile_ok and remat_off) or off_kept
    # A remat-off compile is the program's figure also where it is the only one kept: under the
    # chip the pass has nothing to do, so both compiles agree.
    if depths == "full" and (
        (over and (need_kept or default is None)) or (default is None and off_kept)
    ):
        # Need against need: the planner's bytes for the program as written, and the compiler's
        # for the same program with XLA's remat pass off (its figure with the pass on is the
        # pass's squeeze, kept as ``compiler_with_xla_remat_gib``; its verdict is the one used).
        c = compiled(cache, name, topology, remat, NO_REMAT_DEPTH, extra, compile_ok, save)
        est = p["per_device_gib"]["total"] * GiB
        got, how, secs = c["total"], "full depth, XLA remat off", c["compile_s"]
        if default is None and compile_ok and "error" in c:
            # the verdict is the default compile's: XLA's remat pass may fit what this cannot
            default = compiled(cache, name, topology, remat, "full", extra, compile_ok, save)
        fits = "error" not in (default or c)
        detail = {"compiler_with_xla_remat_gib": default["total"] / GiB if default else None}
    elif depths == "full":
        # Within the chip XLA's remat pass has nothing to do: the planner's need against the
        # compiler's figure of the program. Over it, where only the default compile is kept,
        # the planner's estimate of XLA's squeeze (``compiled_estimate``) against that compile.
        est = p["per_device_gib"]["compiled_estimate"] * GiB
        c = compiled(cache, name, topology, remat, "full", extra, compile_ok, save)
        got, secs = c["total"], c["compile_s"]
        fits = "error" not in c
        how = "full depth, XLA remat on" if over else "full depth"
    else:
        est = p["per_device_gib"]["total"] * GiB
        a, b = (int(x) for x in depths.split(","))
        ca, cb = (
            compiled(cache, name, topology, remat, d, extra, compile_ok, save) for d in (a, b)
        )
        slope = (cb["total"] - ca["total"]) / (b - a)
        got = ca["total"] + slope * (n - a)
        pa, pb = (planned(name, topology, remat, extra, d)["per_device_gib"]["total"] * GiB
                  for d in (a, b))  # fmt: skip
        p_slope = (pb - pa) / (b - a)
        detail = {
            "compiler_per_layer_gib": slope / GiB, "planner_per_layer_gib": p_slope / GiB,
            "compiler_fixed_gib": (ca["total"] - slope * a) / GiB,
            "planner_fixed_gib": (pa - p_slope * a) / GiB,
        }  # fmt: skip
        how, secs = f"layers {a},{b} → {n}", ca["compile_s"] + cb["compile_s"]
    return {
        "config": name, "topology": topology, "remat": remat, "planner_gib": est / GiB,
        "compiler_gib": got / GiB, "diff": (est - got) / got, "capacity_gib": kind.memory_bytes / GiB,
        "compiler_fits": fits if fits is not None else got <= kind.memory_bytes,
        "planner_fits": p["fits"],
        "planner_need_gib": p["per_device_gib"]["total"],
        "planner_host_offload_gib": p["per_device_gib"]["host_offload"],
        "compile_s": secs, "method": how, **detail,
    }  # fmt: skip


def planner_only(name, topology, remat, extra) -> dict:
    """A row not compiled yet: the planner's numbers and an empty compiler column."""
    p = planned(name, topology, remat, extra)
    m = p["per_device_gib"]
    return {"config": name, "topology": topology, "remat": remat,
            "planner_gib": m["total"], "planner_need_gib": m["total"],
            "planner_fits": p["fits"], "compiler_gib": None, "method": "not compiled yet"}  # fmt: skip


def planner_cell(r: dict) -> str:
    need = r.get("planner_need_gib", r["planner_gib"])
    if need > r["planner_gib"] + 0.005:
        return f"{r['planner_gib']:.2f} (need {need:.2f})"
    return f"{r['planner_gib']:.2f}"


def markdown(rows: list[dict]) -> str:
    out = [
        "| config | topology | remat | planner GiB/chip | compiler GiB/chip | diff | fits (plan / compiler) | compiled as |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]  # fmt: skip
    for r in rows:
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        if r["compiler_gib"] is None:
            out.append(
                f"| {r['config']} | {r['topology']} | {r['remat']} | {planner_cell(r)} | – | – | "
                f"{yes(r['planner_fits'])} / – | {r['method']} |"
            )
            continue
        out.append(
            f"| {r['config']} | {r['topology']} | {r['remat']} | {planner_cell(r)} | "
            f"{r['compiler_gib']:.2f} | {r['diff']:+.1%} | {yes(r['planner_fits'])} / "
            f"{yes(r['compiler_fits'])} | {r['method']} |"
        )
    return "\n".join(out)


def all_rows() -> list[tuple[str, str, str]]:
    todo = []
    for name, topologies in TOPOLOGIES.items():
        for topology in topologies:
            for remat in REMATS:
                if remat != "offload" or OFFLOAD_ON[name] == topology:
                    todo.append((name, topology, remat))
    return todo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", help="config:gen:grid:remat (default: the whole table)")
    ap.add_argument("--depths", default="full", help="'full' or 'a,b' (extrapolate)")
    ap.add_argument("--out", default="", help="markdown table (and the .json cache beside it)")
    ap.add_argument("--from-json", default="", help="compiler numbers from this JSON; no compiles")
    ap.add_argument("--import-report", action="append", default=[],
                    help="config:gen:grid:remat=compile_report.json of `lmtrain compile` (full "
                    "depth) to use for that row instead of compiling it again")  # fmt: skip
    ap.add_argument("--override", action="append", default=[], help="extra config overrides")
    ap.add_argument("--xla-remat-on", action="store_true",
                    help="rows over the chip: compile with XLA's remat pass on (as `lmtrain "
                    "compile` does) where no remat-off compile is kept, instead of with it off")  # fmt: skip
    args = ap.parse_args()
    if args.rows:
        todo = []
        for r in args.rows:
            name, gen, grid, remat = r.split(":")
            todo.append((name, f"{gen}:{grid}", remat))
    else:
        todo = all_rows()
    out_json = os.path.splitext(args.out)[0] + ".json" if args.out else ""
    source = args.from_json or out_json
    cache = {}
    if source and os.path.exists(source):
        with open(source) as f:
            cache = current(json.load(f).get("compiled", {}))
    for spec in args.import_report:
        k, numbers = import_report(spec, args.override)
        cache[k] = numbers
    rows: list[dict] = []

    def save() -> None:
        if out_json:
            with open(out_json, "w") as f:
                json.dump({"depths": args.depths, "overrides": args.override, "rows": rows,
                           "compiled": cache}, f, indent=1)  # fmt: skip

    for name, topology, remat in todo:
        try:
            r = row(name, topology, remat, args.depths, args.override, cache, not args.from_json,
                    save, not args.xla_remat_on)  # fmt: skip
        except LookupError as e:  # --from-json without this row: the planner's side only
            print(f"{e}", file=sys.stderr)
            r = planner_only(name, topology, remat, args.override)
        except Exception as e:  # noqa: BLE001 - one row's failure leaves the others to run
            print(f"{name} {topology} {remat}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows.append(r)
        save()
        print(json.dumps(r), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        save()


if __name__ == "__main__":
    main()
