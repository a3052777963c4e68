"""Where LlamaStep's fused small ops first part from its PyTorch forward on CUDA.

Runs a prefill through both paths of the SmolLM2-shaped random model of test_small_ops_gpu.py and
records, in order, every residual add, RMSNorm and attention output; prints the first record whose
inputs are bitwise equal and whose outputs are not (the op that rounds differently), with the count
and size of the differences, then replays that op alone on the plain path's inputs.

    python tests/gpu/small_ops_diff.py [--dtype float16] [--rows 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_small_ops_gpu import PROMPT, WIDTH, MAX_LEN, _smol_shaped  # noqa: E402

from libortho.kernels import small_ops  # noqa: E402
from libortho.serve.llama_step import LlamaStep  # noqa: E402


def _record(step: LlamaStep) -> list[tuple]:
    """Wraps the step's add-norm and attention: (name, inputs, output, module) of each call, in order."""
    log: list[tuple] = []
    add_norm, attention = step._add_norm, step._attention

    def _add_norm(h, delta, norm):
        out = add_norm(h, delta, norm)
        log.append(("add", (h, delta), out[0], None))
        log.append(("norm", (out[0],), out[1], norm))
        return out

    def _attention(attn, x, cos, sin, *rest):
        out = attention(attn, x, cos, sin, *rest)
        log.append(("attention", (x, cos, sin), out, attn))
        return out

    step._add_norm, step._attention = _add_norm, _attention
    return log


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = _smol_shaped(dtype)
    logs = []
    for fused in (True, False):
        step = LlamaStep(model, MAX_LEN, fused=fused)
        log = _record(step)
        cache = step.new_cache(args.rows)
        cache.ready(WIDTH)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 2048, (args.rows, PROMPT), generator=g).cuda()
        pos = torch.arange(PROMPT, device="cuda").expand(args.rows, PROMPT).contiguous()
        last = torch.full((args.rows,), PROMPT - 1, device="cuda")
        with torch.no_grad():
            step.forward(cache, ids, pos, pos, last, WIDTH, torch.arange(args.rows, device="cuda"))
        logs.append(log)
    for i, ((name, got_in, got, module), (_, want_in, want, _)) in enumerate(zip(*logs)):
        inputs_same = all(_same(a, b) for a, b in zip(got_in, want_in))
        if _same(got, want):
            continue
        d = (got.float() - want.float()).abs()
        print(f"record {i} ({name}, block {i // 5}): inputs {'equal' if inputs_same else 'differ'}; "
              f"{int((d > 0).sum())} of {d.numel()} outputs differ, largest {d.max().item():.3g}")
        if inputs_same and name == "norm":
            h, norm = got_in[0], module
            x = h.to(torch.float32)
            var = x.pow(2).mean(-1, keepdim=True)
            fused = small_ops.add_rms_norm(h, None, norm.weight, norm.variance_epsilon)[1]
            for label, inv in (("torch.rsqrt", torch.rsqrt(var + norm.variance_epsilon)),
                               ("1/sqrt", 1.0 / torch.sqrt(var + norm.variance_epsilon))):
                ref = norm.weight * (x * inv).to(dtype)
                print(f"  fused against reference with {label}: {int((fused != ref).sum())} differ")
        if inputs_same:
            break
    else:
        print("no record differs")


if __name__ == "__main__":
    main()
