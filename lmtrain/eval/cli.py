"""``lmtrain eval``: run an eval config on a checkpoint, or compare two reports.

    lmtrain eval --checkpoint runs/shakespeare --config configs/eval/shakespeare.py --out eval/
    lmtrain eval --compare eval/run_a eval/run_b [--tolerance 0.01] [--out cmp.md]

``--config.<key>=value`` overrides keys of the eval config (e.g. ``--config.latency.repeats=1``).
"""

from __future__ import annotations

import os
import sys
import time

from lmtrain.errors import ConfigError


def run_eval(
    checkpoint: str, config_path: str, out_dir: str, *, step=None, overrides=(), print_fn=print
) -> dict:
    """Evaluate ``checkpoint`` (a training workdir) with an eval config; write the report."""
    import jax

    from lmtrain.eval.report import write_report
    from lmtrain.eval.suite import EvalContext, load_eval_config, run_suite
    from lmtrain.infer.loader import load_run

    suite = load_eval_config(config_path, overrides)
    t0 = time.perf_counter()
    run = load_run(checkpoint, step)
    setup = run.setup
    seq_len = suite["seq_len"] or int(setup.config.data.seq_len)
    ctx = EvalContext(
        setup.model,
        run.params,
        setup.tokenizer,
        seq_len=seq_len,
        batch_size=suite["batch_size"],
        mesh=setup.mesh,
        data_dir=setup.data_dir,
        prompt_len_multiple=suite["prompt_len_multiple"],
    )
    print_fn(f"evaluating {checkpoint} step {run.step} with {config_path}")
    results = run_suite(ctx, suite, print_fn=print_fn)
    device = jax.devices()[0]
    results["title"] = suite["title"]
    results["run"] = {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_dir": run.checkpoint_dir,
        "step": run.step,
        "eval_config": config_path,
        "params": setup.model_cfg.param_count(),
        "devices": f"{jax.device_count()} x {getattr(device, 'device_kind', device.platform)}",
        "mesh": str(dict(setup.mesh.shape)),
        "eval_wall_s": time.perf_counter() - t0,
    }
    metrics_jsonl = os.path.join(checkpoint, "metrics.jsonl")
    report = write_report(
        out_dir, results, metrics_jsonl if os.path.isfile(metrics_jsonl) else None
    )
    print_fn(f"wrote {os.path.join(out_dir, 'report.md')} and report.json")
    return report


def cmd_eval(args, overrides) -> None:
    from lmtrain.eval.report import compare_reports

    if args.compare:
        if args.checkpoint or args.config:
            raise ConfigError("--compare A B takes two reports; drop --checkpoint/--config")
        a, b = args.compare
        table = compare_reports(
            a,
            b,
            tolerance=args.tolerance,
            labels=(
                os.path.basename(os.path.normpath(a)) or "A",
                os.path.basename(os.path.normpath(b)) or "B",
            ),
        )
        print(table)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(table)
        if args.fail_on_regression and "**0 regression(s)**" not in table:
            sys.exit(1)
        return
    if not (args.checkpoint and args.config and args.out):
        raise ConfigError(
            "lmtrain eval needs --checkpoint <workdir> --config configs/eval/<name>.py --out "
            "<dir> (or --compare A B)"
        )
    if args.allow_code_execution:
        from lmtrain.eval.code_exec import ALLOW_ENV

        os.environ[ALLOW_ENV] = "1"
    run_eval(args.checkpoint, args.config, args.out, step=args.step, overrides=overrides)


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (report.md/json, plots) or compare"
    )
    e.add_argument("--checkpoint", help="training workdir to evaluate")
    e.add_argument("--config", help="eval config, e.g. configs/eval/shakespeare.py")
    e.add_argument("--out", help="report directory (with --compare: a markdown file)")
    e.add_argument("--step", default=None, help="checkpoint step: latest (default), best or N")
    e.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two report dirs/json files")
    e.add_argument("--tolerance", type=float, default=0.0, help="ignore smaller |deltas|")
    e.add_argument("--fail-on-regression", action="store_true", help="exit 1 on a regression")
    e.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="let code tasks run model-generated programs (sandboxed; see lmtrain/eval/sandbox.py)",
    )
    e.set_defaults(fn=cmd_eval)
