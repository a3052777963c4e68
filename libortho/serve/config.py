"""Every setting of `libortho serve`, with its default, in one frozen dataclass.

The command line, the app factory and the engine all read a ServeConfig; none of them writes a
default of its own. Importing this module imports nothing heavy (no torch, no FastAPI), so
`libortho serve --help` stays fast and bad values are refused before the model loads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

DEVICES = ("cpu", "cuda")
# max_batch when none is given: a GPU step costs about the same for 1 row as for 64 (it reads the weights
# once either way), a CPU step grows with the rows
MAX_BATCH_BY_DEVICE = {"cpu": 8, "cuda": 64}
LOG_LEVELS = ("debug", "info", "warning", "error")

# the command-line flag of each setting that has one, so that an error names what the user typed
FLAGS = {"host": "--host", "port": "--port", "keys_path": "--keys", "device": "--device", "max_batch": "--max-batch",
         "max_context": "--max-context", "max_wait_ms": "--max-wait-ms", "max_queue": "--max-queue",
         "threads": "--threads", "model_name": "--model-name", "log_level": "--log-level", "upstream": "--upstream",
         "upstream_model": "--upstream-model", "upstream_adapter": "--upstream-adapter",
         "upstream_timeout_s": "--upstream-timeout-s", "fused_small_ops": "--fused-small-ops"}


class ServeConfigError(ValueError):
    """A server setting that cannot work; the message names the setting and what it accepts."""


@dataclass(frozen=True)
class ServeConfig:
    """The settings of one server. Times are in the unit their name ends with (ms, s)."""

    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 listens on every interface
    port: int = 8000
    keys_path: str | Path | None = None  # KEYS.json; None: base-only mode (no key needed, alpha 0 only)
    device: str = "cpu"
    max_batch: int | None = None  # rows decoded together (KV cache slots); None: MAX_BATCH_BY_DEVICE[device]
    max_context: int | None = None  # tokens per request (prompt + completion) the KV cache holds; None: the model's
    # context length (max_position_embeddings)
    max_wait_ms: float = 10.0  # how long an idle server waits for companions before it starts a batch
    max_queue: int = 256  # requests waiting for a batch slot; one more gets 429
    threads: int | None = None  # torch CPU threads; None: torch's own choice
    model_name: str | None = None  # the model id clients send; None: the artifact folder's name
    log_level: str = "info"
    shutdown_grace_s: float = 5.0  # after the drain, how long uvicorn waits for open connections to close
    stop_timeout_s: float = 30.0  # at shutdown, how long the engine may take to finish its queued and running rows
    keys_poll_s: float = 1.0  # how often KEYS.json is checked for changes (a changed file is re-read)
    # limits on what one request may ask for, so that no client can hold the server up
    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body gets 413, whether Content-Length says so or not
    # JSON values in a body (about: commas, brackets and strings); parsing holds the interpreter for
    # time in proportion (2 million numbers: 0.4 s), which would stall every other request
    max_json_values: int = 65536
    prompt_chars_per_token: int = 16  # a prompt of more characters per context token is refused before tokenizing
    max_messages: int = 256  # chat messages per request
    max_stops: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string
    # the engine (Llama-architecture models; others use the padded batch of kvbatch.py)
    prefill_chunk: int = 256  # prompt tokens prefilled per step, over all rows, between two decode steps
    cuda_graphs: bool = True  # on CUDA, replay decode steps and prefill chunks from CUDA graphs (False: eager)
    graph_warmup: bool = True  # with graphs: capture the common step shapes when the engine starts, not mid-request
    slot_cache: bool = True  # False: the padded batch (kvbatch.py) even for models the slot cache can run
    # on CUDA fp16/bf16, the slot cache's forward runs the fused Triton small ops (norms, RoPE and cache writes);
    # off until tests/gpu/test_small_ops_gpu.py has passed on a GPU (they are checked under the interpreter only)
    fused_small_ops: bool = False
    # gateway mode: no model runs here; admitted requests are forwarded to an OpenAI-compatible engine
    upstream: str | None = None  # the engine's base URL as a client's base_url (http://host:port/v1); None: no gateway
    upstream_model: str | None = None  # the engine's name of the base model (alpha 0); None: model_name
    upstream_adapter: str | None = None  # the engine's name of the LoRA adapter (alpha 1); None: alpha 1 is refused
    upstream_timeout_s: float = 600.0  # how long one forwarded request may take, streamed or not

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> ServeConfig:
        """A config from a mapping such as `vars(argparse_namespace)`: None means "not given"
        (the default applies), and keys that are not settings are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})

    def __post_init__(self) -> None:
        _check_text("host", self.host)
        _check_int("port", self.port, 1, 65535)
        if self.keys_path is not None and not isinstance(self.keys_path, (str, Path)):
            raise ServeConfigError(f"{_label('keys_path')} must be a path to a KEYS.json, got {self.keys_path!r}")
        _check_choice("device", self.device, DEVICES)
        if self.max_batch is not None:
            _check_int("max_batch", self.max_batch, 1)
        if self.max_context is not None:
            _check_int("max_context", self.max_context, 2)
        _check_duration("max_wait_ms", self.max_wait_ms)
        _check_int("max_queue", self.max_queue, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.model_name is not None:
            _check_text("model_name", self.model_name)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_duration("shutdown_grace_s", self.shutdown_grace_s)
        _check_duration("stop_timeout_s", self.stop_timeout_s)
        _check_duration("keys_poll_s", self.keys_poll_s)
        if self.keys_poll_s == 0:  # a watcher that never sleeps would spin on a core
            raise ServeConfigError(f"{_label('keys_poll_s')} must be a number > 0, got 0")
        for name in ("max_body_bytes", "max_json_values", "prompt_chars_per_token", "max_messages", "max_stops",
                     "max_stop_chars"):
            _check_int(name, getattr(self, name), 1)
        _check_int("prefill_chunk", self.prefill_chunk, 1)
        for name in ("cuda_graphs", "graph_warmup", "slot_cache", "fused_small_ops"):
            if not isinstance(getattr(self, name), bool):
                raise ServeConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_upstream()

    def _check_upstream(self) -> None:
        """The gateway settings: a http(s) URL, and names only alongside it."""
        _check_duration("upstream_timeout_s", self.upstream_timeout_s)
        if self.upstream_timeout_s == 0:
            raise ServeConfigError(f"{_label('upstream_timeout_s')} must be a number > 0, got 0")
        for name in ("upstream_model", "upstream_adapter"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
                if self.upstream is None:
                    raise ServeConfigError(f"{_label(name)} needs --upstream URL (it names a model of the upstream)")
        if self.upstream is None:
            return
        _check_text("upstream", self.upstream)
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServeConfigError(f"{_label('upstream')} must be an http:// or https:// URL such as "
                                   f"http://127.0.0.1:8001/v1, got {self.upstream!r}")
        if self.model_name is None and self.upstream_model is None:
            raise ServeConfigError("--upstream needs --upstream-model NAME (the upstream's base model) or "
                                   "--model-name NAME (the model id clients send, then also the upstream's)")

    @property
    def upstream_base(self) -> str | None:
        """The upstream's OpenAI base URL without a trailing slash; a bare host gets /v1, where the
        OpenAI routes live (a URL with a path is taken as given)."""
        if self.upstream is None:
            return None
        base = self.upstream.rstrip("/")
        return base if urlsplit(base).path else base + "/v1"

    @property
    def served_model_name(self) -> str | None:
        """The model id clients send: model_name, or in gateway mode the upstream's base model name."""
        return self.model_name or self.upstream_model

    @property
    def resolved_max_batch(self) -> int:
        """max_batch, or the device's default when none was given."""
        return self.max_batch if self.max_batch is not None else MAX_BATCH_BY_DEVICE[self.device]


def _label(name: str) -> str:
    """`max_batch (--max-batch)`: the setting's name in Python and on the command line."""
    return f"{name} ({FLAGS[name]})" if name in FLAGS else name


def _check_int(name: str, value: object, low: int, high: float = math.inf) -> None:
    # bool is an int subclass, but `max_batch=True` is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServeConfigError(f"{_label(name)} must be a whole number, got {value!r}")
    if not low <= value <= high:
        bound = f"from {low} to {high}" if high != math.inf else f">= {low}"
        raise ServeConfigError(f"{_label(name)} must be a whole number {bound}, got {value}")


def _check_duration(name: str, value: object) -> None:
    """A duration: a finite number >= 0 (the unit is in the name)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ServeConfigError(f"{_label(name)} must be a number >= 0, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ServeConfigError(f"{_label(name)} must be one of {', '.join(choices)}; got {value!r}")


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ServeConfigError(f"{_label(name)} must be a non-empty string, got {value!r}")
