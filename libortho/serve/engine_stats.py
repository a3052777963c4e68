"""Where the engine's time goes: seconds per phase of its iterations, and how the model steps ran
(replayed from a CUDA graph, captured, or eager).

Phases of one worker iteration (wall-clock seconds on the worker thread, time.perf_counter):
  * admit: new rows take their slots;
  * prefill: the prompt chunk, from building its inputs to its first tokens handed out (on a GPU
    this includes waiting for the chunk's forward: its sampling reads the tokens back);
  * decode: building the step's inputs and launching it (eager: the whole forward);
  * sample: choosing the tokens, which on a GPU waits for the step to finish (the one host sync);
  * tokens: detokenising, stop strings, and the events handed to the requests' sinks;
  * release: finished rows leaving the cache.

Steps, by kind ("prefill", "decode"): graph replays, eager steps (no graph: CPU, graphs off, or a
capture that failed), captures and failed captures, and the tokens of prefill chunks (real and
with padding). Thread-safe: the worker records, the metrics endpoint and benchmarks read.
"""
from __future__ import annotations

import threading
from collections import defaultdict

PHASES = ("admit", "prefill", "decode", "sample", "tokens", "release")
KINDS = ("prefill", "decode")
STEP_EVENTS = ("replays", "eager", "captures", "capture_failures")


class EngineStats:
    """Counters of one engine. All times in seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.iterations = 0  # worker iterations that did any work
        self.seconds: dict[str, float] = defaultdict(float)  # phase -> seconds
        self.steps: dict[tuple[str, str], int] = defaultdict(int)  # (kind, event) -> count
        self.capture_seconds = 0.0
        self.prefill_tokens = 0  # prompt tokens read
        self.prefill_padded_tokens = 0  # tokens the prefill forwards ran, padding included

    # ---- recording (the worker thread) --------------------------------------------------------
    def iteration(self, phases: dict[str, float]) -> None:
        """One worker iteration's seconds per phase (a subset of PHASES)."""
        with self._lock:
            self.iterations += 1
            for name, seconds in phases.items():
                self.seconds[name] += seconds

    def step(self, kind: str, event: str, n: int = 1) -> None:
        """A model step of `kind` ("prefill" / "decode"): event one of STEP_EVENTS."""
        with self._lock:
            self.steps[(kind, event)] += n

    def captured(self, kind: str, seconds: float, ok: bool) -> None:
        with self._lock:
            self.steps[(kind, "captures" if ok else "capture_failures")] += 1
            self.capture_seconds += seconds

    def prefilled(self, real: int, padded: int) -> None:
        with self._lock:
            self.prefill_tokens += real
            self.prefill_padded_tokens += padded

    # ---- reading ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A plain dict of every counter (JSON-ready): iterations, seconds by phase, mean
        iteration ms, the prefill's share of the time, steps by kind and event."""
        with self._lock:
            seconds = {p: self.seconds.get(p, 0.0) for p in PHASES}
            steps = {k: {e: self.steps.get((k, e), 0) for e in STEP_EVENTS} for k in KINDS}
            out = dict(iterations=self.iterations, seconds=seconds, steps=steps,
                       capture_seconds=self.capture_seconds, prefill_tokens=self.prefill_tokens,
                       prefill_padded_tokens=self.prefill_padded_tokens)
        total = sum(seconds.values())
        out["total_seconds"] = total
        out["mean_iteration_ms"] = 1e3 * total / out["iterations"] if out["iterations"] else float("nan")
        out["prefill_share"] = seconds["prefill"] / total if total else float("nan")
        return out

    def lines(self) -> list[str]:
        """Prometheus text-format lines of the counters."""
        snap = self.snapshot()
        out = ["# HELP libortho_engine_iterations_total Worker iterations that did work.",
               "# TYPE libortho_engine_iterations_total counter",
               f"libortho_engine_iterations_total {snap['iterations']}",
               "# HELP libortho_engine_seconds_total Worker seconds by phase of its iterations.",
               "# TYPE libortho_engine_seconds_total counter"]
        out += [f'libortho_engine_seconds_total{{phase="{p}"}} {s:.6f}' for p, s in snap["seconds"].items()]
        out += ["# HELP libortho_engine_steps_total Model steps by kind and how they ran.",
                "# TYPE libortho_engine_steps_total counter"]
        out += [f'libortho_engine_steps_total{{kind="{k}",event="{e}"}} {n}'
                for k, events in snap["steps"].items() for e, n in events.items()]
        out += ["# HELP libortho_engine_capture_seconds_total Seconds spent capturing CUDA graphs.",
                "# TYPE libortho_engine_capture_seconds_total counter",
                f"libortho_engine_capture_seconds_total {snap['capture_seconds']:.6f}",
                "# HELP libortho_engine_prefill_tokens_total Prompt tokens prefilled (padded: as run).",
                "# TYPE libortho_engine_prefill_tokens_total counter",
                f'libortho_engine_prefill_tokens_total{{padded="false"}} {snap["prefill_tokens"]}',
                f'libortho_engine_prefill_tokens_total{{padded="true"}} {snap["prefill_padded_tokens"]}']
        return out


def difference(after: dict, before: dict) -> dict:
    """The counters of one stretch of time: snapshot `after` minus snapshot `before`, with the
    derived values (mean iteration ms, prefill share) recomputed."""
    seconds = {p: after["seconds"][p] - before["seconds"][p] for p in PHASES}
    steps = {k: {e: after["steps"][k][e] - before["steps"][k][e] for e in STEP_EVENTS} for k in KINDS}
    iterations = after["iterations"] - before["iterations"]
    total = sum(seconds.values())
    out = dict(iterations=iterations, seconds=seconds, steps=steps,
               capture_seconds=after["capture_seconds"] - before["capture_seconds"],
               prefill_tokens=after["prefill_tokens"] - before["prefill_tokens"],
               prefill_padded_tokens=after["prefill_padded_tokens"] - before["prefill_padded_tokens"],
               total_seconds=total)
    out["mean_iteration_ms"] = 1e3 * total / iterations if iterations else float("nan")
    out["prefill_share"] = seconds["prefill"] / total if total else float("nan")
    return out
