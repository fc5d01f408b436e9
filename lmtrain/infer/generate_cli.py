"""``lmtrain generate``: sample from a trained run, once (``--prompt``) or interactively."""

from __future__ import annotations

import time


def add_generate_args(g) -> None:
    g.add_argument("--workdir", "--checkpoint", dest="workdir", required=True)
    g.add_argument("--prompt", default=None, help="omit (or --interactive) for a prompt loop")
    g.add_argument("--interactive", action="store_true")
    g.add_argument("--step", default=None, help="checkpoint step: latest (default), best or N")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string (repeatable; '\\n' escapes allowed)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timing", action="store_true", help="print time to first token and tok/s")


def run_generate(args, overrides, *, input_fn=None, print_fn=print) -> None:
    import builtins

    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.infer.loader import load_run
    from lmtrain.infer.sampling import SamplingParams, decode_completions, generate, stop_token_ids

    input_fn = input_fn or builtins.input  # looked up per call (tests patch it)
    run = load_run(args.workdir, args.step, overrides)
    setup, tok = run.setup, run.setup.tokenizer
    stops = [s.encode().decode("unicode_escape") for s in args.stop]
    sp = SamplingParams(
        args.max_new_tokens,
        tok.eos_id,
        args.temperature,
        args.top_k,
        args.top_p,
        stop_token_ids(tok, stops),
        past_context=True,  # past the context the window slides
    )
    interactive = args.interactive or args.prompt is None
    seed = args.seed
    while True:
        if interactive:
            try:
                prompt = input_fn("prompt> ")
            except (EOFError, KeyboardInterrupt):
                print_fn("")
                break
        else:
            prompt = args.prompt
        ids = tok.encode(prompt) or [tok.bos_id]
        t0 = time.perf_counter()
        prompts = [ids] * args.num_samples
        g = generate(setup.model, run.params, prompts, sp, seed=seed, pad_id=tok.pad_id,
                     mesh=setup.mesh)  # fmt: skip
        wall = time.perf_counter() - t0
        seed += 1  # a new sample each prompt in interactive mode
        for text, reason in zip(*decode_completions(tok, g, stops)):
            print_fn(prompt + text)
            print_fn(f"--- [{reason}]")
        if args.timing:
            n = sum(len(t) for t in g.tokens)
            print_fn(
                f"time to first token {1e3 * g.timing['prefill_s']:.1f} ms | {n} tokens in "
                f"{wall:.2f}s ({n / wall:,.0f} tok/s; the first call includes compiling)"
            )
        if not interactive:
            break
