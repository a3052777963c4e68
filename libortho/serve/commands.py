"""The `libortho serve` and `libortho keys` subcommands (argument parsing imports nothing heavy)."""
from __future__ import annotations

import argparse

# The CLI's own argument checks, so that `serve` rejects bad values with the same messages.
from ..cli_args import alpha_value as _alpha
from ..cli_args import nonnegative_float as _nonnegative_ms
from ..cli_args import positive_int as _positive


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `keys` to the top-level subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server; each API key's privilege caps its alpha")
    p.add_argument("artifact", metavar="ARTIFACT", help="libortho artifact folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", default=None, metavar="KEYS.json",
                   help="API keys with their max alpha (libortho keys add); without it: no key needed, alpha 0 only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-batch", type=_positive, default=8, metavar="N", help="rows decoded together")
    p.add_argument("--max-wait-ms", type=_nonnegative_ms, default=10.0, metavar="T",
                   help="how long an idle server waits for companions before starting a batch")
    p.add_argument("--max-queue", type=_positive, default=256, metavar="N",
                   help="requests waiting for a batch slot; beyond this: 429")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice); 1 is fastest for small models on busy machines")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact folder name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_serve)

    p = sub.add_parser("keys", help="manage API keys for libortho serve")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys_sub.add_parser("add", help="add a random key; prints it once on stdout")
    k.add_argument("keys_file", metavar="KEYS.json", help="created if missing")
    k.add_argument("name", metavar="NAME")
    k.add_argument("--max-alpha", type=_alpha, required=True, metavar="A", help="highest alpha this key may use")
    k.add_argument("--default-alpha", type=_alpha, default=None, metavar="A",
                   help="alpha when a request asks for none (default 0; must be <= --max-alpha)")
    k.set_defaults(func=run_keys_add)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from .server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.artifact, host=args.host, port=args.port, keys_path=args.keys, device=args.device,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          model_name=args.model_name, log_level=args.log_level)
    return 0


def run_keys_add(args: argparse.Namespace) -> int:
    from .keys import add_key

    key = add_key(args.keys_file, args.name, args.max_alpha, args.default_alpha)
    print(key)  # the only line on stdout, so `KEY=$(libortho keys add ...)` works
    return 0
