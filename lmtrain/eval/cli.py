"""``lmtrain eval``: run an eval config on a checkpoint, or compare two reports.

    lmtrain eval --checkpoint runs/shakespeare --config configs/eval/shakespeare.py --out eval/
    lmtrain eval --compare eval/run_a eval/run_b [--tolerance 0.01] [--out cmp.md]
    lmtrain eval --harness --tasks arc_easy,hellaswag --checkpoint runs/x --out eval/ \
        [--include-path tests/support/harness_tasks] [--config configs/eval/shakespeare.py]

``--harness`` runs lm-evaluation-harness tasks with the ``lmtrain`` backend
(``lmtrain/eval/harness.py``) and writes lm-eval's ``harness_results.json`` beside the report,
whose tables then show both (with ``--config``, lmtrain's own suite runs too).

``--config.<key>=value`` overrides keys of the eval config (e.g. ``--config.latency.repeats=1``).
"""

from __future__ import annotations

import os
import sys
import time

from lmtrain.errors import ConfigError


def run_eval(
    checkpoint: str,
    config_path: str | None,
    out_dir: str,
    *,
    step=None,
    overrides=(),
    print_fn=print,
    harness: dict | None = None,
) -> dict:
    """Evaluate ``checkpoint`` (a training workdir) with an eval config and/or lm-eval tasks
    (``harness``: keyword arguments of ``lmtrain.eval.harness.run_harness``); write the report."""
    import jax

    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.eval.report import write_report
    from lmtrain.eval.suite import load_eval_config
    from lmtrain.infer.loader import load_run

    suite = load_eval_config(config_path, overrides) if config_path else None
    t0 = time.perf_counter()
    run = load_run(checkpoint, step)
    setup = run.setup
    if suite is None:
        results = {"title": "lm-evaluation-harness report"}
    else:
        results = _run_suite(run, suite, checkpoint, config_path, print_fn)
    if harness:
        results["harness"] = _run_harness(run, harness, out_dir, print_fn)
    device = jax.devices()[0]
    results["run"] = {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_dir": run.checkpoint_dir,
        "step": run.step,
        "eval_config": config_path or "",
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


def _run_harness(run, spec: dict, out_dir: str, print_fn) -> dict:
    try:
        # lazily: lm-eval is an optional extra
        from lmtrain.eval import harness
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lm_eval":
            raise ConfigError(
                "--harness needs lm-evaluation-harness: pip install 'lmtrain[eval]'"
            ) from None
        raise
    from lm_eval.utils import make_table

    lm = harness.LmtrainLM(run=run, batch_size=spec.pop("batch_size", 8))
    results = harness.run_harness(lm, **spec)
    path = harness.write_results(out_dir, results)
    print_fn(make_table(results))
    print_fn(f"wrote {path}")
    return harness.harness_summary(results)


def _run_suite(run, suite: dict, checkpoint: str, config_path: str, print_fn) -> dict:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.eval.suite import EvalContext, run_suite

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
    results["title"] = suite["title"]
    return results


def cmd_eval(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
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
    harness = None
    if args.harness:
        tasks = [t for t in (args.tasks or "").split(",") if t]
        if not tasks:
            raise ConfigError("--harness needs --tasks name[,name...] (lm-eval task names)")
        harness = dict(
            tasks=tasks,
            include_path=args.include_path or None,
            # lm-eval reads a limit below 1 as a fraction of each task's documents
            limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
        )
    elif args.tasks or args.include_path:
        raise ConfigError("--tasks/--include-path name lm-eval tasks: add --harness")
    if not (args.checkpoint and (args.config or harness) and args.out):
        raise ConfigError(
            "lmtrain eval needs --checkpoint <workdir> --config configs/eval/<name>.py --out "
            "<dir> (or --harness --tasks a,b instead of / besides --config; or --compare A B)"
        )
    if args.allow_code_execution:
        # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
        from lmtrain.sandbox.code_exec import ALLOW_ENV

        os.environ[ALLOW_ENV] = "1"
    run_eval(
        args.checkpoint, args.config, args.out, step=args.step, overrides=overrides,
        harness=harness,
    )  # fmt: skip


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
        help="let code tasks run model-generated programs (sandboxed; see lmtrain/sandbox/isolation.py)",
    )
    e.add_argument("--harness", action="store_true", help="run lm-evaluation-harness tasks")
    e.add_argument("--tasks", default="", help="--harness: comma-separated lm-eval task names")
    e.add_argument("--include-path", default="", help="--harness: folder of extra task YAMLs")
    e.add_argument("--limit", type=float, default=None, help="--harness: docs per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="--harness: few-shot examples")
    e.add_argument("--batch-size", type=int, default=8, help="--harness: rows per batch")
    e.set_defaults(fn=cmd_eval)
