"""The `libortho serve` and `libortho keys` subcommands (argument parsing imports nothing heavy).

Every serve option defaults to None, meaning "not given": ServeConfig fills in its own default
and checks every value, so defaults and checks live in one place (`config.py`).
"""
from __future__ import annotations

import argparse
import importlib
import logging

from ..cli_args import UserError, alpha_value
from .config import DEVICES, LOG_LEVELS, MAX_BATCH_BY_DEVICE, ServeConfig

SERVE_MODULES = ("fastapi", "uvicorn", "pydantic")  # what the `serve` extra installs
GATEWAY_MODULES = ("httpx",)  # what gateway mode needs besides (the HTTP client to the upstream)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `keys` to the top-level subparsers."""
    _add_serve(sub)
    _add_keys(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    default = ServeConfig()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server; each API key's privilege caps its alpha")
    p.add_argument("artifact", metavar="ARTIFACT", nargs="?",
                   help="libortho artifact folder (not with --upstream, where no model runs here)")
    p.add_argument("--host", help=f"address to listen on (default {default.host})")
    p.add_argument("--port", type=int, help=f"port to listen on (default {default.port})")
    p.add_argument("--keys", dest="keys_path", metavar="KEYS.json",
                   help="API keys with their max alpha (libortho keys add); without it: no key needed, alpha 0 only")
    p.add_argument("--device", choices=DEVICES, help=f"where the model runs (default {default.device})")
    by_device = ", ".join(f"{n} on {d}" for d, n in MAX_BATCH_BY_DEVICE.items())
    p.add_argument("--max-batch", type=int, metavar="N", help=f"rows decoded together (default {by_device})")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="tokens per request, prompt plus completion, that the KV cache holds (default: the model's "
                        "context length)")
    p.add_argument("--max-wait-ms", type=float, metavar="T",
                   help="how long an idle server waits for companions before starting a batch "
                        f"(default {default.max_wait_ms:g})")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help=f"requests waiting for a batch slot; beyond this: 429 (default {default.max_queue})")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice); 1 is fastest for small models on busy "
                        "machines")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients send (default: the artifact folder name)")
    p.add_argument("--log-level", choices=LOG_LEVELS,
                   help=f"least severe log messages shown (default {default.log_level})")
    p.add_argument("--fused-small-ops", action="store_const", const=True, default=None,
                   help="on CUDA (fp16/bf16), run a block's norms, RoPE and cache writes as fused Triton kernels "
                   "(fewer launches per step; bitwise the PyTorch forward under Triton's interpreter, not yet checked "
                   "on a GPU: off by default)")
    g = p.add_argument_group("gateway mode", "keys, alpha gate, limits and metrics here; the model runs upstream")
    g.add_argument("--upstream", metavar="URL",
                   help="forward admitted requests to this OpenAI-compatible engine (base URL, e.g. "
                        "http://127.0.0.1:8001/v1) instead of serving an ARTIFACT")
    g.add_argument("--upstream-model", metavar="NAME",
                   help="the upstream's base model, served at alpha 0 (default: --model-name)")
    g.add_argument("--upstream-adapter", metavar="NAME",
                   help="the upstream's LoRA adapter, served at alpha 1 (default: none, alpha 1 is refused)")
    g.add_argument("--upstream-timeout-s", type=float, metavar="T",
                   help=f"seconds one forwarded request may take (default {default.upstream_timeout_s:g})")
    p.set_defaults(func=run_serve)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage API keys for libortho serve (a running server picks up changes)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys_sub.add_parser("add", help="add a random key; prints it once on stdout")
    k.add_argument("keys_file", metavar="KEYS.json", help="created if missing")
    k.add_argument("name", metavar="NAME", help="1 to 64 characters from A-Z a-z 0-9 . _ -")
    k.add_argument("--max-alpha", type=alpha_value, required=True, metavar="A", help="highest alpha this key may use")
    k.add_argument("--default-alpha", type=alpha_value, default=None, metavar="A",
                   help="alpha when a request asks for none (default 0; must be <= --max-alpha)")
    k.set_defaults(func=run_keys_add)
    k = keys_sub.add_parser("list", help="the keys' names and alphas, one per line (never the keys)")
    k.add_argument("keys_file", metavar="KEYS.json")
    k.set_defaults(func=run_keys_list)
    k = keys_sub.add_parser("revoke", help="remove a key; a running server refuses it from the next poll (1 s)")
    k.add_argument("keys_file", metavar="KEYS.json")
    k.add_argument("name", metavar="NAME")
    k.set_defaults(func=run_keys_revoke)
    k = keys_sub.add_parser("set", help="change a key's alphas; a running server applies it from the next poll")
    k.add_argument("keys_file", metavar="KEYS.json")
    k.add_argument("name", metavar="NAME")
    k.add_argument("--max-alpha", type=alpha_value, default=None, metavar="A", help="new highest alpha")
    k.add_argument("--default-alpha", type=alpha_value, default=None, metavar="A",
                   help="new alpha when a request asks for none (must be <= the max)")
    k.set_defaults(func=run_keys_set)


def run_serve(args: argparse.Namespace) -> int:
    config = ServeConfig.from_options(vars(args))  # checked before the slow imports below
    if (args.artifact is None) == (config.upstream is None):
        raise UserError("serve needs an ARTIFACT folder, or --upstream URL for gateway mode (not both)")
    _require_serve_extra(GATEWAY_MODULES if config.upstream is not None else ())

    from .server import serve

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.artifact, config)
    return 0


def _require_serve_extra(more: tuple[str, ...] = ()) -> None:
    """UserError naming the install command when a module of the `serve` extra (or `more`) is missing."""
    for name in SERVE_MODULES + more:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"serving needs {name}, which is not installed: pip install 'libortho[serve]' "
                            "(in a checkout: pip install -e '.[serve]')") from None


def run_keys_add(args: argparse.Namespace) -> int:
    from .keys import add_key

    key = add_key(args.keys_file, args.name, args.max_alpha, args.default_alpha)
    print(key)  # the only line on stdout, so `KEY=$(libortho keys add ...)` works
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    from .keys import list_keys

    for entry in list_keys(args.keys_file):
        print(_described(entry))
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from .keys import revoke_key

    revoke_key(args.keys_file, args.name)
    print(f"revoked {args.name}")
    return 0


def run_keys_set(args: argparse.Namespace) -> int:
    from .keys import set_key

    print(_described(set_key(args.keys_file, args.name, args.max_alpha, args.default_alpha)))
    return 0


def _described(entry) -> str:
    """One key as a line of `keys list`: name, max_alpha and default_alpha (every digit), tab-separated."""
    return f"{entry.name}\tmax_alpha={entry.max_alpha!r}\tdefault_alpha={entry.default_alpha!r}"
