"""Bounded load test of `libortho serve` on localhost: a fixed number of requests from 64
concurrent clients with mixed alphas, against the same requests sent one at a time.

    python benchmarks/serve_load.py ARTIFACT [--requests 256] [--concurrency 64] [--max-tokens 32]
                                    [--alphas 0 1] [--serial 16] [--max-batch 64] [--stream]
                                    [--in-process] [--device cuda] [--json out.json]

Starts the server itself (a subprocess on a free 127.0.0.1 port, with a temporary KEYS.json whose
key may use alpha 1), or drives a running one with --url and --key. With --in-process there is no
HTTP at all: the artifact is loaded here and the requests go straight to the serving Engine from
client threads (no FastAPI, uvicorn, pydantic or httpx needed), which measures the engine alone.

Reports requests/s, generated tokens/s, p50/p99 latency for both phases, p50/p90 time to first
token (streamed requests, `--stream`; in-process always), the decode batch sizes reached (from
/metrics, or the engine's metrics), the error count, and where the engine's time went during the
concurrent phase (engine_stats: worker iterations, mean ms per iteration and per phase, the
prefill's share, graph replays against eager steps, captures). Every request has a timeout, so
the run always ends.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from libortho.serve.engine_stats import difference

PROMPTS = [
    "The quick brown fox", "Python is a programming language that", "Lists, tuples and dictionaries",
    "Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein",
    "The weather today is", "To make a cup of tea,", "Machine learning models",
]


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100], nearest-rank on the sorted values (seconds)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else float("nan")


# one request's outcome: (latency s, time to first token s or None, completion tokens, error or None)
Outcome = tuple[float, float | None, int, str | None]


async def one(client, model: str, i: int, alpha: float, max_tokens: int, stream: bool) -> Outcome:
    """Request i, streamed or not (`client`: an httpx.AsyncClient)."""
    import httpx

    body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
            "alpha": alpha}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return latency, None, 0, f"HTTP {r.status_code}: {r.text[:200]}"
            return latency, None, int(r.json()["usage"]["completion_tokens"]), None
        body.update(stream=True, stream_options={"include_usage": True})
        first, tokens = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return time.perf_counter() - t0, None, 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return time.perf_counter() - t0, first, tokens, f"stream error: {chunk['error']}"
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
        return time.perf_counter() - t0, first, tokens, None
    except httpx.HTTPError as err:
        return time.perf_counter() - t0, None, 0, f"{type(err).__name__}: {err}"


async def phase(url: str, key: str, model: str, n: int, concurrency: int, alphas: list[float], max_tokens: int,
                stream: bool = False) -> dict:
    """n requests over HTTP, at most `concurrency` in flight; alphas cycle over the requests."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def run(i: int):
            async with gate:
                return await one(client, model, i, alphas[i % len(alphas)], max_tokens, stream)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return summary(results, n, concurrency, wall)


def summary(results: list[Outcome], n: int, concurrency: int, wall: float) -> dict:
    latencies = [r[0] for r in results if r[3] is None]
    firsts = [r[1] for r in results if r[3] is None and r[1] is not None]
    tokens = sum(r[2] for r in results)
    errors = [r[3] for r in results if r[3] is not None]
    return dict(requests=n, concurrency=concurrency, wall_s=wall, requests_per_s=n / wall, tokens=tokens,
                tokens_per_s=tokens / wall, p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99),
                mean_s=statistics.fmean(latencies) if latencies else float("nan"),
                ttft_p50_s=percentile(firsts, 50), ttft_p90_s=percentile(firsts, 90), errors=len(errors),
                first_errors=errors[:3])


# ---- in process: the Engine without HTTP ----------------------------------------------------------
def engine_phase(engine, n: int, concurrency: int, alphas: list[float], max_tokens: int) -> dict:
    """n requests submitted straight to the engine, at most `concurrency` in flight."""
    from libortho.serve.engine import Job
    from libortho.serve.sampling import SamplingParams

    prompts = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
    results: list[Outcome | None] = [None] * n
    slots = threading.Semaphore(concurrency)
    finished = threading.Semaphore(0)

    def sink_for(i: int, t0: float):
        state = {"first": None}

        def sink(event) -> None:
            now = time.perf_counter()
            if event.kind == "text" and state["first"] is None:
                state["first"] = now - t0
            elif event.kind != "text":
                error = None if event.kind == "done" else event.message
                results[i] = (now - t0, state["first"], event.completion_tokens, error)
                slots.release()
                finished.release()
        return sink

    t0 = time.perf_counter()
    for i in range(n):
        slots.acquire()
        engine.submit(Job(prompts[i % len(prompts)], max_tokens, SamplingParams(0.0), [], alphas[i % len(alphas)],
                          sink_for(i, time.perf_counter())))
    for _ in range(n):
        if not finished.acquire(timeout=600):
            raise SystemExit("a request did not finish within 600 s")
    return summary(results, n, concurrency, time.perf_counter() - t0)


def engine_batch_stats(engine) -> dict:
    m = engine.metrics
    return dict(max_batch=float(m.max_batch_seen), decode_steps=float(m.batch_size.n), row_steps=m.batch_size.total,
                row_steps_by_alpha={a: float(v) for a, v in m.batch_rows.items()})


def run_in_process(args) -> tuple[dict, dict, dict, dict]:
    """(serial, concurrent, batch stats, engine counters of the concurrent phase) of the engine
    driven directly."""
    import torch

    import libortho
    from libortho.serve.config import ServeConfig
    from libortho.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ServeConfig().device
    model, tok = libortho.load(args.artifact, alpha=0.0, device=device, with_ortho=max(args.alphas) > 0)
    options = {"device": device, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "fused_small_ops": args.fused_small_ops,
               "max_queue": max(args.requests, ServeConfig().max_queue)}
    engine = Engine(model, tok, ServeConfig.from_options(options))
    engine.start()
    try:
        engine_phase(engine, 2 * args.concurrency, args.concurrency, args.alphas, 4)  # warm-up: graphs, caches
        serial = engine_phase(engine, args.serial, 1, args.alphas, args.max_tokens)
        before, counters = engine_batch_stats(engine), engine.stats()
        loaded = engine_phase(engine, args.requests, args.concurrency, args.alphas, args.max_tokens)
        after, graphs = engine_batch_stats(engine), engine.stats()
    finally:
        engine.stop()
    counters = difference(graphs, counters)
    counters.update(graphs=graphs["graphs"], graphs_failed=graphs["graphs_failed"])
    return serial, loaded, batches_between(before, after), counters


def batches_between(before: dict, after: dict) -> dict:
    """The batch counters of one phase: `after` minus what earlier phases left in `before`."""
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["row_steps"] - before["row_steps"]
    return dict(max_batch=after["max_batch"], decode_steps=steps, mean_batch=rows / steps if steps else float("nan"),
                row_steps_by_alpha={a: v - before["row_steps_by_alpha"].get(a, 0.0)
                                    for a, v in after["row_steps_by_alpha"].items()})


def engine_line(c: dict) -> str:
    """Where the engine's time went in the concurrent phase, in a few lines."""
    n = c["iterations"] or float("nan")
    phases = ", ".join(f"{p} {1e3 * t / n:.2f}" for p, t in c["seconds"].items())
    steps = "; ".join(f"{k}: {e['replays']:.0f} graph replays, {e['eager']:.0f} eager, {e['captures']:.0f} captures"
                      f" ({e['capture_failures']:.0f} failed)" for k, e in c["steps"].items())
    padded = c["prefill_padded_tokens"] / c["prefill_tokens"] if c["prefill_tokens"] else float("nan")
    return (f"engine: {c['iterations']:.0f} iterations, {c['mean_iteration_ms']:.2f} ms each ({phases} ms); "
            f"prefill {100 * c['prefill_share']:.0f} % of the time, {padded:.2f}x tokens with padding\n"
            f"steps: {steps}; capturing {c['capture_seconds']:.1f} s")


# ---- over HTTP ------------------------------------------------------------------------------------
def engine_counters(text: str) -> dict:
    """The engine's counters (an EngineStats snapshot) read back from /metrics text."""
    from libortho.serve.engine_stats import KINDS, PHASES, STEP_EVENTS

    def value(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    return dict(iterations=value(r"^libortho_engine_iterations_total (\S+)"),
                seconds={p: value(rf'^libortho_engine_seconds_total\{{phase="{p}"\}} (\S+)') for p in PHASES},
                steps={k: {e: value(rf'^libortho_engine_steps_total\{{kind="{k}",event="{e}"\}} (\S+)')
                           for e in STEP_EVENTS} for k in KINDS},
                capture_seconds=value(r"^libortho_engine_capture_seconds_total (\S+)"),
                prefill_tokens=value(r'^libortho_engine_prefill_tokens_total\{padded="false"\} (\S+)'),
                prefill_padded_tokens=value(r'^libortho_engine_prefill_tokens_total\{padded="true"\} (\S+)'))


def batch_stats(url: str) -> dict:
    """Decode batch counters from /metrics: largest batch, steps, row-steps, and row-steps by
    alpha; and the engine's counters (`engine`)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text

    def value(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else float("nan")

    steps = value(r"^libortho_batch_size_count (\S+)")
    rows = value(r"^libortho_batch_size_sum (\S+)")
    by_alpha = {a: float(v) for a, v in re.findall(r'^libortho_batch_rows_total\{alpha="([^"]+)"\} (\S+)', text, re.M)}
    return dict(max_batch=value(r"^libortho_batch_size_max (\S+)"), decode_steps=steps, row_steps=rows,
                row_steps_by_alpha=by_alpha, engine=engine_counters(text))


def start_server(artifact: str, args) -> tuple[subprocess.Popen, str, str, str]:
    """(process, url, key, model name) of a fresh server on a free localhost port."""
    import httpx

    from libortho.serve.config import ServeConfig
    from libortho.serve.keys import add_key
    from libortho.serve.server import free_port

    tmp = Path(tempfile.mkdtemp(prefix="libortho-load-"))
    key = add_key(tmp / "KEYS.json", "load", 1.0)
    port = free_port()
    # the queue holds every request of the run, so the load test measures batching, not 429s
    queue = max(args.requests, ServeConfig().max_queue)
    options = {"--device": args.device, "--max-batch": args.max_batch, "--max-wait-ms": args.max_wait_ms,
               "--max-queue": queue, "--threads": args.threads}  # None: the server's default
    flags = [str(x) for flag, value in options.items() if value is not None for x in (flag, value)]
    flags += ["--fused-small-ops"] if args.fused_small_ops else []
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "libortho.cli", "serve", artifact, "--port", str(port),
                             "--keys", str(tmp / "KEYS.json"), "--model-name", "bench", "--log-level", "warning",
                             *flags], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, key, "bench"
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start; see {tmp / 'server.log'}")
        time.sleep(0.2)


def run_http(args) -> tuple[dict, dict, dict, dict, str]:
    """(serial, concurrent, batch stats, engine counters of the concurrent phase, url) over HTTP,
    against --url or a server started here."""
    proc = None
    if args.url:
        url, key, model = args.url.rstrip("/"), args.key or "none", args.model or "bench"
    else:
        proc, url, key, model = start_server(args.artifact, args)
    try:
        # warm-up: dense weight caches, first allocations, CUDA graphs of the batch sizes the load reaches
        asyncio.run(phase(url, key, model, 2 * args.concurrency, args.concurrency, args.alphas, 4))
        serial = asyncio.run(phase(url, key, model, args.serial, 1, args.alphas, args.max_tokens, args.stream))
        before = batch_stats(url)
        loaded = asyncio.run(phase(url, key, model, args.requests, args.concurrency, args.alphas, args.max_tokens,
                                   args.stream))
        after = batch_stats(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return serial, loaded, batches_between(before, after), difference(after["engine"], before["engine"]), url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="?", help="libortho artifact (omit with --url)")
    p.add_argument("--url", help="a running server instead of starting one")
    p.add_argument("--key", help="API key for --url (must allow the highest of --alphas)")
    p.add_argument("--model", default=None, help="model name for --url")
    p.add_argument("--in-process", action="store_true",
                   help="no HTTP: load the artifact here and submit to the serving engine directly")
    p.add_argument("--stream", action="store_true", help="streamed requests (reports time to first token)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--serial", type=int, default=16, help="requests of the one-at-a-time baseline")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0], help="cycled over the requests")
    p.add_argument("--device", default=None, help="the server's device (serve --device; default: serve's)")
    p.add_argument("--max-batch", type=int, default=64, help="serve --max-batch (64 here: the concurrency)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="serve --max-wait-ms (default: serve's)")
    p.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads (serve --threads)")
    p.add_argument("--fused-small-ops", action="store_const", const=True, default=None,
                   help="serve --fused-small-ops (CUDA: fused norms, RoPE and cache writes)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    if not args.url and not args.artifact:
        p.error("give an ARTIFACT or --url")
    if args.in_process and (args.url or not args.artifact):
        p.error("--in-process needs an ARTIFACT (and no --url)")

    if args.in_process:
        (serial, loaded, batches, engine), url = run_in_process(args), "in-process"
    else:
        serial, loaded, batches, engine, url = run_http(args)
    result = dict(url=url, alphas=args.alphas, max_tokens=args.max_tokens, max_batch=args.max_batch, threads=args.threads,
                  device=args.device, stream=args.stream or args.in_process, serial=serial, concurrent=loaded,
                  batches=batches, engine=engine, speedup_tokens_per_s=loaded["tokens_per_s"] / serial["tokens_per_s"])
    print(f"{'':>12} {'requests':>8} {'req/s':>8} {'tok/s':>8} {'p50 s':>8} {'p99 s':>8} {'ttft50':>8} "
          f"{'ttft90':>8} {'errors':>6}")
    for name, r in (("serial", serial), (f"{args.concurrency} clients", loaded)):
        print(f"{name:>12} {r['requests']:>8} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['p50_s']:>8.3f} {r['p99_s']:>8.3f} {r['ttft_p50_s']:>8.3f} {r['ttft_p90_s']:>8.3f} {r['errors']:>6}")
    print(f"decode batch: max {batches['max_batch']:.0f}, mean {batches['mean_batch']:.1f} rows; "
          f"row-steps by alpha {batches['row_steps_by_alpha']}; tokens/s x{result['speedup_tokens_per_s']:.2f} vs serial")
    print(engine_line(engine))
    for err in loaded["first_errors"] + serial["first_errors"]:
        print("error:", err)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if loaded["errors"] == 0 and serial["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
