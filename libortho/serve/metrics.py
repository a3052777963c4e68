"""Prometheus text-format metrics, labelled by alpha: requests, tokens, latency, batch sizes; and
the engine's own counters (engine_stats: time per phase, graph replays, eager steps).

Hand-rolled (a few counters and histograms) so serving needs no metrics dependency. Thread-safe:
the engine thread and the HTTP handlers both record.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

from .engine_stats import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows


def alpha_label(alpha: float) -> str:
    """Alpha as a label value rounded to one decimal ("0", "0.1", ..., "1"): eleven values at
    most, so clients asking for many different alphas cannot grow the metrics without bound."""
    return format(round(alpha, 1) + 0.0, "g")  # + 0.0: -0.0 (or a tiny negative rounded) is "0"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{upper:g}"}} {c}' for upper, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6f}" if labels else f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.n}" if labels else f"{name}_count {self.n}")
        return out


class Metrics:
    """Counters and histograms of one server. `gauges` are read when rendering (queue, active rows)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (alpha, endpoint, status)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.first_token: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(BATCH_BUCKETS)  # rows per decode step
        self.batch_rows: dict[str, int] = defaultdict(int)  # row-steps per alpha: who shares the batches
        self.max_batch_seen = 0
        self.gauges: dict[str, Callable[[], float]] = {}
        self.engine = EngineStats()  # where the engine's time goes (its iterations, graphs, eager steps)

    def request_done(self, alpha: float | None, endpoint: str, status: int, latency_s: float | None = None,
                     prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """One finished request; alpha None for requests refused before an alpha was granted."""
        a = "none" if alpha is None else alpha_label(alpha)
        with self._lock:
            self.requests[(a, endpoint, status)] += 1
            self.prompt_tokens[a] += prompt_tokens
            self.completion_tokens[a] += completion_tokens
            if latency_s is not None:
                self.latency.setdefault(a, _Histogram(LATENCY_BUCKETS)).observe(latency_s)

    def first_token_after(self, alpha: float, seconds: float) -> None:
        with self._lock:
            self.first_token.setdefault(alpha_label(alpha), _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def decode_step(self, alphas: list[float]) -> None:
        """One batched decode step over rows with these alphas."""
        with self._lock:
            self.batch_size.observe(len(alphas))
            self.max_batch_seen = max(self.max_batch_seen, len(alphas))
            for a in alphas:
                self.batch_rows[alpha_label(a)] += 1

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            out = ["# HELP libortho_requests_total Finished HTTP generation requests by alpha, endpoint and status.",
                   "# TYPE libortho_requests_total counter"]
            for (a, ep, st), n in sorted(self.requests.items()):
                out.append(f'libortho_requests_total{{alpha="{a}",endpoint="{ep}",status="{st}"}} {n}')
            for name, table, what in (("libortho_prompt_tokens_total", self.prompt_tokens, "Prompt tokens"),
                                      ("libortho_completion_tokens_total", self.completion_tokens, "Generated tokens")):
                out += [f"# HELP {name} {what} by alpha.", f"# TYPE {name} counter"]
                out += [f'{name}{{alpha="{a}"}} {n}' for a, n in sorted(table.items())]
            for name, table, what in (("libortho_request_latency_seconds", self.latency, "Request latency"),
                                      ("libortho_time_to_first_token_seconds", self.first_token, "Time to first token")):
                out += [f"# HELP {name} {what} by alpha.", f"# TYPE {name} histogram"]
                for a, h in sorted(table.items()):
                    out += h.lines(name, f'alpha="{a}"')
            out += ["# HELP libortho_batch_size Rows per batched decode step.", "# TYPE libortho_batch_size histogram"]
            out += self.batch_size.lines("libortho_batch_size", "")
            out += ["# HELP libortho_batch_size_max Largest decode batch so far.", "# TYPE libortho_batch_size_max gauge",
                    f"libortho_batch_size_max {self.max_batch_seen}"]
            out += ["# HELP libortho_batch_rows_total Row-steps decoded, by the row's alpha.",
                    "# TYPE libortho_batch_rows_total counter"]
            out += [f'libortho_batch_rows_total{{alpha="{a}"}} {n}' for a, n in sorted(self.batch_rows.items())]
            gauges = dict(self.gauges)
        out += self.engine.lines()
        for name, read in sorted(gauges.items()):
            out += [f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(out) + "\n"
