"""``lmtrain <command>``: data, tokenizer, train, generate (more commands register themselves).

Dotted overrides follow the config path: ``--config.train.steps=200``.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmtrain.errors import LmtrainError


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for a in argv:
        (overrides if a.startswith("--config.") else rest).append(a)
    return rest, [o[len("--config.") :] for o in overrides]


def cmd_train(args, overrides):
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.config import load_config
    from lmtrain.train.loop import train

    cfg = load_config(args.config, overrides)
    train(cfg, args.workdir)


def cmd_data_prepare(args, overrides):
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.config import apply_overrides, load_config_file
    from lmtrain.data.prepare import prepare

    cfg = load_config_file(args.config)
    apply_overrides(cfg, overrides)
    if args.runner == "beam":
        # lazily: apache-beam is an optional extra
        from lmtrain.data.beam_runner import prepare_beam

        manifest = prepare_beam(cfg, args.out, args.overwrite, args.beam_options)
    else:
        manifest = prepare(cfg, args.out, overwrite=args.overwrite)
    print("[data] documents per stage: " + json.dumps(manifest.get("flow", {})))
    counts = manifest.get("splits", {})
    print(
        f"wrote {args.out}: "
        + ", ".join(
            f"{k} {v['documents']} docs / {v['index']['num_tokens']} tokens"
            for k, v in counts.items()
        )
    )


def cmd_generate(args, overrides):
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.infer.generate_cli import run_generate

    run_generate(args, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a run")
    t.add_argument("--config", required=True)
    t.add_argument("--workdir", required=True)
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="raw text → cleaned, deduplicated token shards + manifest")
    dp.add_argument("--config", required=True)
    dp.add_argument("--out", required=True)
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--runner", choices=("local", "beam"), default="local",
                    help="local processes (one machine) or an Apache Beam pipeline")  # fmt: skip
    dp.add_argument("--beam-options", default="",
                    help='Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..."')  # fmt: skip
    dp.set_defaults(fn=cmd_data_prepare)
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.data.fetch import add_fetch_parser

    add_fetch_parser(dsub)  # lmtrain data fetch NAME

    g = sub.add_parser("generate", help="sample from a trained run")
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.infer.generate_cli import add_generate_args

    add_generate_args(g)
    g.set_defaults(fn=cmd_generate)

    for register in _extra_commands():
        register(sub)
    return p


COMMAND_MODULES = (
    "lmtrain.data.tokenizer_cli",  # tokenizer train
    "lmtrain.eval.cli",  # eval
    "lmtrain.interop.cli",  # import hf, export hf/stablehlo
    "lmtrain.serve.cli",  # serve
    "lmtrain.plan",  # plan
    "lmtrain.aot.cli",  # compile (ahead of time, for a TPU topology)
)


def _extra_commands():
    """Commands contributed by other modules (each exposes ``register(subparsers)``)."""
    import importlib

    regs = []
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        regs.append(m.register)
    return regs


def _default_host_devices(rest: list[str], overrides: list[str]) -> None:
    """``lmtrain train`` on CPU: one device per core unless XLA_FLAGS says otherwise. Runs
    before the parser is built, since building it imports modules that import jax."""
    if not rest or rest[0] != "train":
        return
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    known, _ = p.parse_known_args(rest[1:])
    if not known.config:
        return
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain import host_devices
    from lmtrain.config import load_config

    try:
        cfg = load_config(known.config, overrides)
    except LmtrainError:
        return  # reported by cmd_train with its usual message
    host_devices.apply_default(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.aot.host import prefer_cpu_without_tpu

    prefer_cpu_without_tpu()  # libtpu installed for `lmtrain compile` on a host without TPUs
    rest, overrides = _split_overrides(argv)
    _default_host_devices(rest, overrides)
    args = build_parser().parse_args(rest)
    try:
        args.fn(args, overrides)
    except LmtrainError as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        # A preemption exits 128 + signal (143 for SIGTERM), as schedulers expect; other errors 2.
        sys.exit(getattr(e, "exit_code", 2))
