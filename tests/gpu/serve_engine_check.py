"""Check the serving engine on a device (CPU or CUDA) without the HTTP stack, on a tiny random Llama
decomposed by libortho, or on an artifact (--artifact DIR):

  * isolation: the largest change of row i's logits when every neighbour's alpha flips (prefill
    and decode), on the slot cache (and, for reference, on the padded batch of kvbatch.py);
  * graph vs eager: the largest difference between the decode logits replayed from CUDA graphs
    and the same steps run eagerly (CUDA only);
  * mixed vs solo: greedy texts of mixed-alpha batches against each request alone, and whether
    any alpha-0 request produced the alpha-1 text (where the two differ).

    python tests/gpu/serve_engine_check.py [--device cuda] [--artifact DIR] [--json out.json]

Exit status 1 if an alpha-0 request got the alpha-1 text, or isolation is not exact on the CPU.
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
from libortho.hf_model import pad_token_id
from libortho.serve.config import ServeConfig
from libortho.serve.engine import Engine, Job
from libortho.serve.kvbatch import KVBatch
from libortho.serve.sampling import SamplingParams
from libortho.serve.slot_runner import SlotRunner


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
STEPS = 6


class _Row:
    """The fields of an engine row that a runner reads and writes."""

    def __init__(self, ids: list[int], alpha: float) -> None:
        self.job = Job(ids, 100, SamplingParams(0.0), [], alpha, lambda e: None)
        self.slot, self.prefilled, self.next_token, self.generated = -1, 0, -1, 0


def slot_logits(model, prompts: list[list[int]], alphas: list[float], config: ServeConfig) -> tuple[list, SlotRunner]:
    """Per row: its logits [V] after the prompt, then after each of STEPS fed tokens (10, 11, ...)."""
    runner = SlotRunner(model, config, 256)
    rows = [_Row(p, a) for p, a in zip(prompts, alphas)]
    out = [[] for _ in rows]
    for r in rows:
        runner.admit(r)
    while any(r.prefilled < len(r.job.prompt_ids) for r in rows):
        done, logits = runner.prefill([r for r in rows if r.prefilled < len(r.job.prompt_ids)])
        for r, x in zip(done, logits):
            out[rows.index(r)].append(x.float().cpu())
            r.generated = 1
    for s in range(STEPS):
        for r in rows:
            r.next_token = 10 + s
        order, logits = runner.decode(rows)
        for r, x in zip(order, logits):
            out[rows.index(r)].append(x.float().cpu())
            r.generated += 1
    return out, runner


def worst(a: list, b: list, rows: list[int] | None = None) -> float:
    rows = range(len(a)) if rows is None else rows
    return max(float((x - y).abs().max()) for i in rows for x, y in zip(a[i], b[i]))


def slot_isolation(model, prompts, config: ServeConfig) -> float:
    base = [float(i % 3) / 2 for i in range(len(prompts))]
    ref, _ = slot_logits(model, prompts, base, config)
    diffs = []
    for i in range(len(prompts)):
        other, _ = slot_logits(model, prompts, [base[j] if j == i else 1.0 - base[j] for j in range(len(prompts))],
                               config)
        diffs.append(worst(ref, other, [i]))
    return max(diffs)


def kvbatch_isolation(model, prompts, pad_id: int) -> float:
    base = [float(i % 3) / 2 for i in range(len(prompts))]

    def run(alphas: list[float]) -> list[torch.Tensor]:
        a = torch.tensor(alphas)
        batch, logits = KVBatch.prefill(model, prompts, a, pad_id)
        out = [logits]
        for step in range(4):
            out.append(batch.step([10 + step] * len(prompts), a))
        return out

    ref = run(base)
    result = 0.0
    for i in range(len(prompts)):
        other = run([base[j] if j == i else 1.0 - base[j] for j in range(len(prompts))])
        result = max(result, max(float((x[i] - y[i]).abs().max()) for x, y in zip(ref, other)))
    return result


def generate(engine: Engine, tok, jobs: list[tuple[str, float]], tokens: int) -> list[str]:
    """Greedy texts of (prompt, alpha) jobs submitted together."""
    texts = [[] for _ in jobs]
    left = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            texts[i].append(event.text if event.kind != "error" else f"<error: {event.message}>")
            if event.kind != "text":
                left.release()
        return sink

    for i, (prompt, alpha) in enumerate(jobs):
        engine.submit(Job(tok(prompt)["input_ids"], tokens, SamplingParams(0.0), [], alpha, sink_for(i)))
    for _ in jobs:
        assert left.acquire(timeout=300)
    return ["".join(t) for t in texts]


def tiny_artifact(device: str):
    helpers = _test_helpers()
    tok = helpers.char_tokenizer()
    model = helpers.tiny_model("llama")
    libortho.decompose(model, tok, helpers.TEXT, libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32,
                                                                      ortho_ratio=0.05, method="rtn"), progress=False)
    path = Path(tempfile.mkdtemp()) / "tiny"
    libortho.save(model, tok, path)
    return libortho.load(path, alpha=0.0, device=device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--artifact", default=None, help="a libortho artifact (default: a tiny random Llama)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    if args.artifact:
        model, tok = libortho.load(args.artifact, alpha=0.0, device=args.device, with_ortho=True)
    else:
        model, tok = tiny_artifact(args.device)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    cuda = args.device == "cuda"
    config = ServeConfig(device=args.device, max_batch=8)
    result: dict = dict(device=args.device, gpu=torch.cuda.get_device_name() if cuda else None,
                        artifact=args.artifact or "tiny random Llama", dtype=str(model.dtype))

    result["slot_isolation_max_abs_diff"] = slot_isolation(model, prompts, config)
    result["kvbatch_isolation_max_abs_diff"] = kvbatch_isolation(model, prompts, pad_token_id(tok))
    alphas = [float(i % 2) for i in range(len(prompts))]
    graphed, runner = slot_logits(model, prompts, alphas, config)
    result["cuda_graphs"] = runner.graphs is not None
    result["graphs_captured"] = [list(k) for k in runner.graphs.captured] if runner.graphs is not None else []
    if cuda:
        eager, _ = slot_logits(model, prompts, alphas, ServeConfig(device="cuda", max_batch=8, cuda_graphs=False))
        result["graph_vs_eager_max_abs_diff"] = worst(graphed, eager)
        result["graph_vs_eager_same_argmax"] = all(int(x.argmax()) == int(y.argmax())
                                                   for a, b in zip(graphed, eager) for x, y in zip(a, b))
    del runner

    engine = Engine(model, tok, ServeConfig(device=args.device, max_batch=32, max_wait_ms=50))
    engine.start()
    try:
        jobs = [(p, a) for p in PROMPTS for a in (0.0, 1.0)]
        solo = {j: generate(engine, tok, [j], args.tokens)[0] for j in jobs}
        t0 = time.perf_counter()
        mixed = dict(zip(jobs, generate(engine, tok, jobs, args.tokens)))
        seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    leaks = sum(1 for p in PROMPTS if solo[(p, 0.0)] != solo[(p, 1.0)] and mixed[(p, 0.0)] == solo[(p, 1.0)])
    result.update(engine=type(engine.runner).__name__, mixed_vs_solo_differ=sum(mixed[j] != solo[j] for j in jobs),
                  requests=len(jobs), prompts_where_alpha_matters=sum(solo[(p, 0.0)] != solo[(p, 1.0)] for p in PROMPTS),
                  alpha0_got_alpha1_text=leaks, errors=sum("<error" in t for t in mixed.values()),
                  max_batch=engine.metrics.max_batch_seen, mixed_seconds=seconds)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    exact_needed = not cuda and result["slot_isolation_max_abs_diff"] != 0.0
    return 0 if leaks == 0 and result["errors"] == 0 and not exact_needed else 1


if __name__ == "__main__":
    sys.exit(main())
