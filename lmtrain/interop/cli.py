"""``lmtrain import hf`` and ``lmtrain export {hf,stablehlo}``."""

from __future__ import annotations

import json

from lmtrain.errors import ConfigError

_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit, mult in _UNITS.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    try:
        return int(t)
    except ValueError:
        raise ConfigError(
            f"size {text!r}: use bytes or a number with KB, MB or GB (e.g. 5GB)"
        ) from None


def cmd_import_hf(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.interop.hf_import import import_hf

    summary = import_hf(
        args.model_dir,
        args.out,
        compute_dtype=args.dtype,
        param_dtype=args.param_dtype,
        seq_len=args.seq_len,
        overwrite=args.overwrite,
        tokenizer=args.tokenizer,
        hf_id=args.hf_id,
    )
    print(json.dumps(summary, indent=2))


def cmd_export_hf(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.interop.hf_export import export_hf, export_peft

    if args.peft:
        summary = export_peft(
            args.workdir, args.out_dir, step=args.step, base_model=args.base_model
        )
    else:
        summary = export_hf(
            args.workdir,
            args.out_dir,
            dtype=args.dtype,
            step=args.step,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    print(json.dumps(summary, indent=2))


def cmd_export_stablehlo(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.interop.stablehlo_export import export_stablehlo

    platforms = tuple(p for p in args.platforms.split(",") if p) or None
    print(
        json.dumps(
            export_stablehlo(args.workdir, args.out_dir, step=args.step, platforms=platforms),
            indent=2,
        )
    )


def register(subparsers) -> None:
    imp = subparsers.add_parser("import", help="import a pre-trained model")
    isub = imp.add_subparsers(dest="import_command", required=True)
    h = isub.add_parser(
        "hf", help="Hugging Face directory (config.json + safetensors) → lmtrain workdir"
    )
    h.add_argument("model_dir")
    h.add_argument("--out", required=True, help="the lmtrain workdir to write")
    h.add_argument(
        "--dtype", default="bfloat16", help="compute dtype recorded in config.model.dtype"
    )
    h.add_argument("--param-dtype", default="float32", help="stored parameter dtype")
    h.add_argument(
        "--seq-len",
        type=int,
        default=2048,
        help="default config.data.seq_len (capped by the model)",
    )
    h.add_argument("--overwrite", action="store_true")
    h.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for a weights-only folder: HF tokenizer folder/tokenizer.json, "
        "SentencePiece .model, or an lmtrain tokenizer folder",
    )
    h.add_argument(
        "--hf-id",
        default=None,
        help="the model's Hugging Face id (recorded; --peft exports use it)",
    )
    h.set_defaults(fn=cmd_import_hf)

    exp = subparsers.add_parser("export", help="export a checkpoint for other tools")
    esub = exp.add_subparsers(dest="export_command", required=True)
    e = esub.add_parser("hf", help="lmtrain workdir → Hugging Face directory (+ MODEL_CARD.md)")
    e.add_argument("workdir")
    e.add_argument("out_dir")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument(
        "--merge",
        action="store_true",
        default=True,
        help="full weights with LoRA adapters merged in (the default)",
    )
    mode.add_argument("--peft", action="store_true", help="LoRA adapters only, in PEFT's format")
    e.add_argument(
        "--base-model",
        default="",
        help="--peft: base_model_name_or_path to record (default: the HF id the base came from)",
    )
    e.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--max-shard-size", default="5GB")
    e.set_defaults(fn=cmd_export_hf)

    s = esub.add_parser("stablehlo", help="forward and KV-cached decode serialised with jax.export")
    s.add_argument("workdir")
    s.add_argument("out_dir")
    s.add_argument("--step", type=int, default=None)
    s.add_argument(
        "--platforms", default="", help="comma-separated, e.g. cpu,cuda (default: this one)"
    )
    s.set_defaults(fn=cmd_export_stablehlo)
