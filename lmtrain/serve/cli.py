"""``lmtrain serve --checkpoint <workdir>``: the OpenAI-shaped HTTP API for a checkpoint."""

from __future__ import annotations

import os

API_KEY_ENV = "LMTRAIN_API_KEY"


def cmd_serve(args, overrides) -> None:
    # lazily: a command loads its module (and jax) only when it runs, so --help stays instant
    from lmtrain.serve.server import ServeLimits, Server, load_service

    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout_s,
        max_queue=args.max_queue,
        max_n=args.max_n,
        workers=args.workers,
        max_pending=args.max_pending,
        backlog=args.backlog,
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    service = load_service(
        args.checkpoint,
        int8=args.int8,
        max_batch=args.max_batch,
        limits=limits,
        step=args.step,
        api_key=api_key,
    )
    server = Server(service, args.host, args.port, verbose=args.verbose)
    print(
        f"serving {args.checkpoint} on {server.url} (/v1/completions, /v1/chat/completions, "
        f"/v1/models, /health, /metrics){'; API key required' if api_key else ''}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="HTTP API (OpenAI completion/chat shapes) for a checkpoint"
    )
    s.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--int8", action="store_true", help="int8 weight-only quantization")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument(
        "--max-tokens", type=int, default=256, help="largest max_tokens a request may ask"
    )
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--timeout-s", type=float, default=60.0, help="wall-clock budget per request")
    s.add_argument("--max-queue", type=int, default=64, help="generation rows waiting; more: 503")
    s.add_argument("--max-n", type=int, default=8, help="most choices (n x prompts) per request")
    s.add_argument("--workers", type=int, default=32, help="connections served at once")
    s.add_argument(
        "--max-pending", type=int, default=32, help="connections waiting for a worker; more: 503"
    )
    s.add_argument("--backlog", type=int, default=1024, help="listen() backlog")
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})",
    )
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(fn=cmd_serve)
