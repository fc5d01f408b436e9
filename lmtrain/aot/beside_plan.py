"""``lmtrain plan --compile``: the compiler's per-chip numbers beside the planner's estimate."""

from __future__ import annotations

import math

from lmtrain.errors import ConfigError

GiB = 1024**3

# Default chip grids for a TPU generation and chip count (``--compile`` without a topology).
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}  # fmt: skip
_GEN = {"tpu-v4": "v4", "tpu-v5e": "v5e", "tpu-v5p": "v5p", "tpu-v6e": "v6e"}


def default_topology(kind: str, count: int) -> str:
    """A topology name for ``count`` chips of a planner device kind (e.g. tpu-v5p, 256)."""
    gen = _GEN.get(kind)
    if gen is None:
        raise ConfigError(
            f"--compile compiles for TPU topologies; --devices {kind}:{count} is not a TPU"
        )
    if gen in ("v5e", "v6e"):  # 2D tori, at most 16 x 16
        side = int(math.isqrt(count))
        for a in range(side, 0, -1):
            if count % a == 0 and count // a <= 16:
                return f"{gen}:{a}x{count // a}"
    elif count in _GRIDS_3D:
        return f"{gen}:{_GRIDS_3D[count]}"
    raise ConfigError(
        f"--compile: no default {gen} topology for {count} chips; name one, e.g. "
        f"--compile {gen}:{'4x4' if gen in ('v5e', 'v6e') else '4x4x4'}"
    )


def side_by_side(plan: dict, report: dict) -> str:
    """Planner estimate vs the compiled train step, per chip."""
    m = plan["per_device_gib"]
    train = next(p for p in report["programs"] if p["program"] == "train_step")
    lines = [f"compiled    {report['topology']} ({report['partitioner']}), train step:"]
    if "error" in train:
        lines.append(f"            DOES NOT FIT: {train['error']}")
        return "\n".join(lines)
    c = train["memory_bytes"]
    args = train["arguments_bytes"]
    rows = [
        ("params + optimizer", m["params"] + m["optimizer"],
         (args.get("params", 0) + args.get("optimizer", 0)) / GiB),
        ("grads + activations", m["gradients"] + m["activations"],
         (c["total"] - c["generated_code"] - c["arguments"]) / GiB),
        ("total", m["total"], c["total"] / GiB),
    ]  # fmt: skip
    lines.append(f"            {'':<22}{'planner':>10}{'compiler':>10}{'diff':>9}")
    for name, est, got in rows:
        diff = (est - got) / got if got else float("nan")
        lines.append(f"            {name:<22}{est:>10.2f}{got:>10.2f}{diff:>+9.1%}")
    verdict = "FITS" if train["fits"] else "DOES NOT FIT"
    lines.append(
        f"            compiler: {verdict} in {train['capacity_bytes'] / GiB:.1f} GiB "
        f"(compiled in {train['compile_s']:.0f} s)"
    )
    return "\n".join(lines)
