"""``lmtrain <command>``: data, tokenizer, train, generate (more commands register themselves).

Dotted overrides follow the config path: ``--config.train.steps=200``.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmtrain.errors import LmtrainError


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for a in argv:
        (overrides if a.startswith("--config.") else rest).append(a)
    return rest, [o[len("--config."):] for o in overrides]


def cmd_train(args, overrides):
    from lmtrain.config import load_config
    from lmtrain.train.loop import train

    cfg = load_config(args.config, overrides)
    train(cfg, args.workdir)


def cmd_data_prepare(args, overrides):
    from lmtrain.config import apply_overrides, load_config_file
    from lmtrain.data.prepare import prepare

    cfg = load_config_file(args.config)
    apply_overrides(cfg, overrides)
    manifest = prepare(cfg, args.out, overwrite=args.overwrite)
    counts = manifest.get("splits", {})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.get('num_documents', '?')} docs / {v.get('num_tokens', '?')} tokens" for k, v in counts.items()))


def cmd_generate(args, overrides):
    import json

    from lmtrain.config import apply_overrides, base_config, check_against_schema
    from lmtrain.train.checkpoint import Checkpointer
    from lmtrain.train.loop import build, sample_texts

    with open(os.path.join(args.workdir, "config.json")) as f:
        import ml_collections

        cfg = ml_collections.ConfigDict(json.load(f))
    check_against_schema(cfg, base_config())
    apply_overrides(cfg, overrides)
    setup = build(cfg, args.workdir)
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"))
    step = ckpt.latest_step()
    if step is None:
        raise LmtrainError(f"no checkpoint in {args.workdir}/checkpoints; train first")
    params = ckpt.restore_params(step, setup.abstract_state.params, setup.shardings.params)
    prompts = [args.prompt] if args.prompt is not None else []
    interactive = args.interactive or not prompts
    while True:
        if interactive:
            try:
                prompt = input("prompt> ")
            except EOFError:
                break
        else:
            if not prompts:
                break
            prompt = prompts.pop()
        for text in sample_texts(setup, params, args.num_samples, args.max_new_tokens, prompt=prompt,
                                 temperature=args.temperature, top_k=args.top_k, seed=args.seed):
            print(text)
            print("---")
        if not interactive:
            break


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
    dp.set_defaults(fn=cmd_data_prepare)

    g = sub.add_parser("generate", help="sample from a trained run")
    g.add_argument("--workdir", "--checkpoint", dest="workdir", required=True)
    g.add_argument("--prompt", default=None)
    g.add_argument("--interactive", action="store_true")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    try:
        args.fn(args, overrides)
    except LmtrainError as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        sys.exit(2)
