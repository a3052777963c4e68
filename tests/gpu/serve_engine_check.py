"""Check the serving engine on a device (CPU or CUDA) without the HTTP stack: per-row alpha
isolation (row i's logits when every neighbour's alpha changes) and mixed-alpha batches against
solo runs, on a tiny random Llama decomposed by libortho.

    python tests/gpu/serve_engine_check.py [--device cuda] [--json out.json]

Exact (0.0) on CPU; on CUDA the fused kernel takes the per-row alpha and the report gives the
largest difference seen (fp16 rounding at most is expected).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import libortho
from libortho.serve.config import ServeConfig
from libortho.serve.engine import Engine, Job
from libortho.serve.kvbatch import KVBatch
from libortho.serve.sampling import SamplingParams


def _test_helpers():
    """tests/conftest.py (tiny tokenizer, tiny model, training text), loaded from its file: this
    script runs outside pytest, and tests/ is no package."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("libortho_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PROMPTS = ["The quick brown", "Python is", "Lists, tuples", "functions are first", "The lazy dog",
           "built-in types", "A programming", "dictionaries"]


def isolation(model, tok) -> float:
    """Largest |row i logits (neighbours' alphas flipped) - row i logits| over rows and steps."""
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    base = [float(i % 3) / 2 for i in range(len(prompts))]

    def run(alphas: list[float]) -> list[torch.Tensor]:
        a = torch.tensor(alphas)
        batch, logits = KVBatch.prefill(model, prompts, a, tok.pad_token_id)
        out = [logits]
        for step in range(4):
            out.append(batch.step([10 + step] * len(prompts), a))
        return out

    ref = run(base)
    worst = 0.0
    for i in range(len(prompts)):
        other = run([base[j] if j == i else 1.0 - base[j] for j in range(len(prompts))])
        worst = max(worst, max(float((x[i] - y[i]).abs().max()) for x, y in zip(ref, other)))
    return worst


def generate(engine: Engine, tok, jobs: list[tuple[str, float]], tokens: int) -> list[str]:
    """Greedy texts of (prompt, alpha) jobs submitted together."""
    texts = [[] for _ in jobs]
    left = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            texts[i].append(event.text)
            if event.kind != "text":
                left.release()
        return sink

    for i, (prompt, alpha) in enumerate(jobs):
        engine.submit(Job(tok(prompt)["input_ids"], tokens, SamplingParams(0.0), [], alpha, sink_for(i)))
    for _ in jobs:
        assert left.acquire(timeout=300)
    return ["".join(t) for t in texts]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    helpers = _test_helpers()
    tok = helpers.char_tokenizer()
    model = helpers.tiny_model("llama")
    libortho.decompose(model, tok, helpers.TEXT, libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32,
                                                              ortho_ratio=0.05, method="rtn"), progress=False)
    path = Path(tempfile.mkdtemp()) / "tiny"
    libortho.save(model, tok, path)
    model, tok = libortho.load(path, alpha=0.0, device=args.device)

    worst = isolation(model, tok)
    engine = Engine(model, tok, ServeConfig(max_batch=32, max_wait_ms=50))
    engine.start()
    try:
        jobs = [(p, a) for p in PROMPTS for a in (0.0, 1.0)]
        solo = {j: generate(engine, tok, [j], args.tokens)[0] for j in jobs}
        t0 = time.perf_counter()
        mixed = dict(zip(jobs, generate(engine, tok, jobs, args.tokens)))
        seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    differ = sum(mixed[j] != solo[j] for j in jobs)
    leaks = sum(1 for p in PROMPTS if solo[(p, 0.0)] != solo[(p, 1.0)] and mixed[(p, 0.0)] == solo[(p, 1.0)])
    alpha_matters = sum(solo[(p, 0.0)] != solo[(p, 1.0)] for p in PROMPTS)
    result = dict(device=str(args.device), gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                  isolation_max_abs_diff=worst, mixed_vs_solo_differ=differ, requests=len(jobs),
                  prompts_where_alpha_matters=alpha_matters, alpha0_got_alpha1_text=leaks,
                  max_batch=engine.metrics.max_batch_seen, mixed_seconds=seconds)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if leaks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
