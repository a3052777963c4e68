"""End-to-end decode speed of a Llama-architecture model at Llama-3-8B shapes, random weights.

hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128, vocab 128256, 32 layers by
default. Q/K/V and gate/up are fused into one projection each, identically for every variant
(qkv 6144×4096, o 4096×4096, gate_up 28672×4096, down 4096×14336). Embedding and lm_head stay
FP16 in every variant. Variants: FP16 (F.linear), libortho alpha = 0, libortho alpha = 1
(``--density`` ortho, default 1 %). Own decode loop: static KV cache (``--max-len``), one
decode step (all layers, greedy argmax fed back, position advanced on the device) captured
in a CUDA graph and replayed; tokens/s = batch / median step time. Norms, RoPE + cache
write and SiLU·mul are small fused Triton kernels shared by all variants; attention is
two matmuls + softmax over the whole static cache with an additive mask (per step).

    python benchmarks/bench_e2e.py [--layers 32] [--batches 1,16] [--json FILE] [--configs F]
        [--ortho privacy] [--int4-lm-head]

``--ortho privacy`` gives every libortho layer the privacy preset's ortho stream (its byte budget
split between sparse entries and a per-layer rank, ``kernel_bench.layers.split_for_shape``, at
the preset's group size, L as the preset's 4-bit codes, read by ``kernels.lowrank_codes``) instead of
``--density`` sparse; ``--int4-lm-head`` makes the libortho
variants' lm_head an INT4 base (outside the privacy split, so never an ortho stream).

With ``--artifact DIR`` it times a real libortho artifact instead (Llama architecture): the
serving engine's own decode step (libortho.serve: slot KV cache, LlamaStep forward, the step
captured in a CUDA graph) at each batch of ``--batches``, every row's prompt prefilled first,
greedy argmax on the device after each replay, no HTTP and no host sync per step. Alphas: all 0,
all 1, and mixed (rows alternate 0 / 1). The ceiling for ``serve_load.py --in-process`` at the
same batch:

    python benchmarks/bench_e2e.py --artifact DIR [--batches 1,64] [--steps 100] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from libortho.kernels import configs, dual_stream_linear, prepare
from libortho.config import preset
from libortho.kernel_bench.layers import split_for_shape
from libortho.kernels.synthetic import as_ortholinear, random_layer, with_coded_lowrank

H, I, NH, NKV, D, V = 4096, 14336, 32, 8, 128, 128256


# Small fused kernels shared by every variant (so the step is not dominated by ~40 tiny
# PyTorch launches per layer): residual add + RMSNorm, RoPE + KV-cache write, SiLU·mul.
@triton.jit
def _add_rms_kernel(h_ptr, d_ptr, out_ptr, eps, H: tl.constexpr, ADD: tl.constexpr):
    """h[b] (+= d[b]); out[b] = h[b] / rms(h[b]) (weights are ones: random model)."""
    b = tl.program_id(0)
    r = tl.arange(0, H)
    h = tl.load(h_ptr + b * H + r).to(tl.float32)
    if ADD:
        h += tl.load(d_ptr + b * H + r).to(tl.float32)
        tl.store(h_ptr + b * H + r, h.to(h_ptr.dtype.element_ty))
    y = h * tl.rsqrt(tl.sum(h * h, 0) / H + eps)
    tl.store(out_ptr + b * H + r, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, scale, T,
                       NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr):
    """Head h of token b: RoPE(q)·scale -> q[b, h]; RoPE(k) / v -> cache[b, kv, pos]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    r = tl.arange(0, HALF)
    pos = tl.load(pos_ptr)
    row = qkv_ptr + b * (NH + 2 * NKV) * D + h * D
    x1 = tl.load(row + r).to(tl.float32)
    x2 = tl.load(row + HALF + r).to(tl.float32)
    if h < NH + NKV:
        c = tl.load(cos_ptr + pos * HALF + r)
        s = tl.load(sin_ptr + pos * HALF + r)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    if h < NH:
        dst = q_ptr + (b * NH + h) * D
        y1 = y1 * scale
        y2 = y2 * scale
    elif h < NH + NKV:
        dst = kc_ptr + ((b * NKV + (h - NH)) * T + pos) * D
    else:
        dst = vc_ptr + ((b * NKV + (h - NH - NKV)) * T + pos) * D
    tl.store(dst + r, y1.to(q_ptr.dtype.element_ty))
    tl.store(dst + HALF + r, y2.to(q_ptr.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(gu_ptr + b * 2 * I + r).to(tl.float32)
    u = tl.load(gu_ptr + b * 2 * I + I + r).to(tl.float32)
    tl.store(out_ptr + b * I + r, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty))


class DecodeModel:
    """Minimal Llama decoder for timing; ``linear(name, layer_index)`` picks the variant."""

    def __init__(self, kind: str, n_layers: int, batch: int, max_len: int, density: float,
                 seed: int = 0, split: Optional[Tuple[float, float, int, int]] = None,
                 int4_lm_head: bool = False) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        dev, f16 = "cuda", torch.float16
        self.kind, self.L, self.B, self.T = kind, n_layers, batch, max_len
        self.alpha = 0.0
        self.layer_class = "F.linear"
        self.embed = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(f16)
        self.lm_head = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(f16)
        if int4_lm_head and kind != "fp16":  # outside the privacy split: base only, no ortho stream
            self.lm_head = as_ortholinear(random_layer(H, V, group_size=128, density=0.0, device=dev, generator=g))
        shapes = dict(qkv=(NH * D + 2 * NKV * D, H), o=(H, NH * D), gu=(2 * I, H), down=(H, I))
        self.w: List[Dict[str, object]] = []
        for _ in range(n_layers):
            layer = {}
            for name, (n, k) in shapes.items():
                if kind == "fp16":
                    layer[name] = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(f16)
                else:
                    group, layer_density, rank, bits = 128, density, 0, 16
                    if split is not None:
                        budget, share, group, bits = split
                        layer_density, rank = split_for_shape(n, k, budget, share, group, bits)
                    src = random_layer(k, n, group_size=group, density=layer_density, device=dev,
                                       generator=g, rank=rank if bits == 16 else 0)
                    try:  # the real layer: its forward calls libortho.kernels on CUDA
                        if bits != 16 and rank:  # L as integer codes, read by kernels.lowrank_codes
                            layer[name] = with_coded_lowrank(src, rank, bits, seed=len(self.w))
                        else:
                            layer[name] = as_ortholinear(src, lowrank=(src.ortho_B, src.ortho_A) if rank else None)
                        self.layer_class = "libortho.layer.OrthoLinear"
                    except ImportError:
                        layer[name] = src
                        self.layer_class = "SyntheticLayer"
                    del src
            self.w.append(layer)
        self.k_cache = torch.zeros(n_layers, batch, NKV, max_len, D, device=dev, dtype=f16)
        self.v_cache = torch.zeros_like(self.k_cache)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().contiguous(), ang.sin().contiguous()  # [T, D/2] fp32
        self.tokens = torch.randint(0, V, (batch,), device=dev, generator=g)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.t_idx = torch.arange(max_len, device=dev)
        if kind != "fp16":
            for lin in self.linears():
                prepare(lin)

    def linears(self) -> List[object]:
        """Every libortho layer: the blocks' projections, and the lm_head when it is INT4."""
        return [lin for layer in self.w for lin in layer.values()] + (
            [] if isinstance(self.lm_head, torch.Tensor) else [self.lm_head])

    def weight_bytes(self) -> int:
        total = self.embed.numel() * 2 / V * self.B
        if isinstance(self.lm_head, torch.Tensor):
            total += self.lm_head.numel() * 2
        for lin in [lin for layer in self.w for lin in layer.values()] + [self.lm_head]:
            if isinstance(lin, torch.Tensor):
                total += 0 if lin is self.lm_head else lin.numel() * 2
                continue
            total += lin.qweight.numel() + lin.scales.numel() * 2
            if self.alpha != 0.0 and lin is not self.lm_head:
                total += lin.ortho_crow.numel() * 4 + lin.ortho_col.numel() * 4 + lin.ortho_val.numel() * 2
                total += (lin.ortho_A.numel() + lin.ortho_B.numel()) * lin.ortho_A.element_size()
                if lin.lowrank_bits != 16:
                    total += sum(getattr(lin, f"ortho_{f}q{p}").numel() * (1 if p == "" else 2)
                                 for f in ("A", "Bt") for p in ("", "_scales", "_zeros"))
        return int(total)

    def set_alpha(self, a: float) -> None:
        """Alpha of every libortho layer (OrthoLinear: its AlphaState default)."""
        self.alpha = a
        for lin in self.linears():
            if hasattr(lin, "alpha_state"):
                lin.alpha_state.default = a if lin is not self.lm_head else 0.0

    def lin(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            return F.linear(x, w)
        if hasattr(w, "alpha_state"):
            return w(x)  # OrthoLinear.forward -> libortho.kernels.dual_stream_linear
        return dual_stream_linear(x, w, self.alpha)

    def step(self) -> None:
        """One greedy decode step for all B sequences at position self.pos (in place)."""
        B, f16 = self.B, torch.float16
        h = self.embed.index_select(0, self.tokens)  # [B, H] residual stream
        x = torch.empty_like(h)
        q = torch.empty(B, NH, D, device=h.device, dtype=f16)
        act = torch.empty(B, I, device=h.device, dtype=f16)
        bias = torch.zeros(self.T, device=h.device, dtype=f16).masked_fill_(
            self.t_idx > self.pos, float("-inf"))  # attention mask, once per step
        _add_rms_kernel[(B,)](h, h, x, 1e-5, H=H, ADD=False)
        for li, w in enumerate(self.w):
            qkv = self.lin(x, w["qkv"])
            _rope_cache_kernel[(B, NH + 2 * NKV)](qkv, self.cos, self.sin, self.pos, q,
                                                   self.k_cache[li], self.v_cache[li],
                                                   D ** -0.5, self.T, NH=NH, NKV=NKV, D=D)
            qg = q.view(B, NKV, NH // NKV, D)
            s = torch.matmul(qg, self.k_cache[li].transpose(-1, -2))  # [B, NKV, 4, T]
            p = torch.softmax(s + bias, -1)
            a = torch.matmul(p, self.v_cache[li]).reshape(B, NH * D)
            _add_rms_kernel[(B,)](h, self.lin(a, w["o"]), x, 1e-5, H=H, ADD=True)
            gu = self.lin(x, w["gu"])
            _silu_mul_kernel[(B, I // 1024)](gu, act, I=I, BLOCK=1024)
            _add_rms_kernel[(B,)](h, self.lin(act, w["down"]), x, 1e-5, H=H, ADD=True)
        logits = self.lin(x, self.lm_head)
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)


def time_decode(model: DecodeModel, steps: int, start: int = 32) -> Dict[str, float]:
    """Capture one step in a CUDA graph, replay; median step time (ms) and tokens/s."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.pos.fill_(start)
            model.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    model.pos.fill_(start)
    with torch.cuda.graph(graph):
        model.step()
    model.pos.fill_(start)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        times.append((e0, e1))
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in times)
    med = statistics.median(ms)
    eager = []
    for _ in range(5):  # eager reference (launch-bound), for context only
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        model.step()
        e1.record()
        eager.append((e0, e1))
    torch.cuda.synchronize()
    del graph
    return dict(step_ms=med, p10_ms=ms[len(ms) // 10], p90_ms=ms[9 * len(ms) // 10],
                tokens_per_s=model.B / (med * 1e-3),
                eager_step_ms=statistics.median(a.elapsed_time(b) for a, b in eager))


def time_artifact(path: str, batches: List[int], steps: int, prompt_len: int = 16,
                  fused_small_ops: bool = False) -> List[Dict[str, object]]:
    """Decode step time of the serving engine's CUDA graph for the artifact at `path`, per batch
    and alpha mix; a row per (batch, alphas). Each row's prompt (`prompt_len` random tokens) is
    prefilled through the engine's runner, then the captured step is replayed `steps` times with
    each row's greedy token fed back on the device (at a fixed position: the step reads the whole
    width bucket whatever the positions, so the cost is the same)."""
    from types import SimpleNamespace

    import libortho
    from libortho.serve.config import ServeConfig
    from libortho.serve.decode_graphs import unpack, width_bucket
    from libortho.serve.slot_runner import SlotRunner

    model, _ = libortho.load(path, alpha=0.0, device="cuda", with_ortho=True)
    loaded_mib = torch.cuda.memory_allocated() / 2**20  # the model as loaded, before any cache
    print(f"device memory after load: {loaded_mib:.1f} MiB", flush=True)
    out = []
    for b in batches:
        runner = SlotRunner(model, ServeConfig(device="cuda", max_batch=b, fused_small_ops=fused_small_ops),
                            4 * prompt_len)
        if runner.graphs is None:
            raise SystemExit("the decode step of this artifact cannot be captured in a CUDA graph (see the log)")
        for mix, alphas in (("0", [0.0] * b), ("1", [1.0] * b), ("mixed", [float(i % 2) for i in range(b)])):
            prompt = torch.randint(3, 1000, (prompt_len,)).tolist()
            rows = [SimpleNamespace(job=SimpleNamespace(prompt_ids=prompt, alpha=a), slot=-1, prefilled=0,
                                    next_token=-1, generated=0) for a in alphas]
            for row in rows:
                runner.admit(row)
            while any(r.prefilled < prompt_len for r in rows):
                done, logits = runner.prefill([r for r in rows if r.prefilled < prompt_len])
                for row, token in zip(done, logits.argmax(-1).tolist()):
                    row.next_token, row.generated = token, 1
            runner.decode(rows)  # captures the step's graph (b rows, the narrowest width) and runs it once
            graphs, width = runner.graphs, width_bucket(prompt_len + 1, runner.cache.max_len)
            step = graphs.captured_step(b, width)  # the graph that decode ran (b is a bucket: b slots)
            ids = unpack(step.ints, b, 1)[0]  # [b, 1]: the graph's token ids

            def one_step() -> None:
                ids.copy_(step.logits.argmax(-1).unsqueeze(1))  # greedy, on the device: no host sync
                step.graph.replay()

            for _ in range(3):
                one_step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                one_step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / steps
            # allocated after the steps: the weights, anything the layers derived from them, the slot cache
            out.append(dict(batch=b, alphas=mix, step_ms=ms, tokens_per_s=b / (ms * 1e-3), width=width,
                            loaded_mib=loaded_mib, allocated_mib=torch.cuda.memory_allocated() / 2**20))
            print(f"batch {b:3d} alphas {mix:5s} step {ms:7.3f} ms  {b / (ms * 1e-3):9.1f} tok/s  "
                  f"(graph of {b} rows x {width} columns, argmax included)", flush=True)
            runner.release(rows)
        del runner
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default=None, metavar="DIR",
                    help="time this libortho artifact's serving decode step (CUDA graph) instead of random 8B shapes")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.01, help="sparse ortho density of every layer (--ortho sparse)")
    ap.add_argument("--ortho", choices=("sparse", "privacy"), default="sparse",
                    help="the libortho layers' ortho stream: sparse at --density, or the privacy preset's "
                    "(its byte budget split between S and per-layer ranks, at its group size)")
    ap.add_argument("--fused-small-ops", action="store_true",
                    help="with --artifact: the engine's fused norms, RoPE and cache writes (ServeConfig.fused_small_ops)")
    ap.add_argument("--int4-lm-head", action="store_true",
                    help="the libortho variants' lm_head as an INT4 base (g128, no ortho stream: outside the "
                    "privacy split); FP16 keeps its FP16 lm_head")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default=None, help="tuned config table (JSON)")
    ap.add_argument("--baseline-configs", default=None,
                    help="also time the libortho model with this config table (variants "
                    "libortho_a*_base): before/after on one card in one run")
    args = ap.parse_args()
    if args.artifact:
        print(f"device {torch.cuda.get_device_name(0)}; artifact {args.artifact}", flush=True)
        rows = time_artifact(args.artifact, [int(x) for x in args.batches.split(",")], args.steps,
                             fused_small_ops=args.fused_small_ops)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(0), args=vars(args), rows=rows), f, indent=1)
        return 0
    if args.configs:
        configs.load_table(args.configs)
    split = None
    if args.ortho == "privacy":
        cfg = preset("privacy")
        split = (cfg.ortho_budget, cfg.lowrank_share, cfg.group_size, cfg.lowrank_bits)
    stream = (f"ortho density {args.density}" if split is None else
              f"privacy preset's ortho stream ({split[0]:g} of the base's bytes, low-rank share {split[1]:g}, g{split[2]}, "
              f"{split[3]}-bit L)")
    print(f"device {torch.cuda.get_device_name(0)}; {args.layers} layers, max_len {args.max_len}, {stream}"
          f"{', INT4 lm_head' if args.int4_lm_head else ''}", flush=True)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for kind in ("fp16", "libortho"):
            model = DecodeModel(kind, args.layers, b, args.max_len, args.density, split=split,
                                int4_lm_head=args.int4_lm_head)
            alphas = [None] if kind == "fp16" else [0.0, 1.0]
            tables = [("", None)]
            if kind != "fp16" and args.baseline_configs:
                tables.append(("_base", args.baseline_configs))
            for (suffix, table), a in ((t, a) for t in tables for a in alphas):
                if table:
                    configs.load_table(table)
                model.set_alpha(a if a is not None else 0.0)
                r = time_decode(model, args.steps)
                name = "fp16" if kind == "fp16" else f"libortho_a{a:g}{suffix}"
                r.update(variant=name, batch=b, layers=args.layers, layer_class=model.layer_class,
                         weight_gb=model.weight_bytes() / 1e9)
                r["weight_gbps"] = r["weight_gb"] / (r["step_ms"] * 1e-3)
                rows.append(r)
                print(f"batch {b:3d} {name:14s} [{model.layer_class}] step {r['step_ms']:7.3f} ms  "
                      f"{r['tokens_per_s']:8.1f} tok/s  (eager {r['eager_step_ms']:.2f} ms; "
                      f"weights {r['weight_gb']:.2f} GB -> {r['weight_gbps']:.0f} GB/s)",
                      flush=True)
            if len(tables) > 1:  # back to the table under test
                configs.load_table(args.configs or configs.TABLE_PATH)
            del model
            torch.cuda.empty_cache()
    print("\n| batch | variant | step ms | tokens/s | vs FP16 |\n|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["variant"] == "fp16")
        r["speedup_vs_fp16"] = base["step_ms"] / r["step_ms"]
        print(f"| {r['batch']} | {r['variant']} | {r['step_ms']:.3f} | {r['tokens_per_s']:.1f} "
              f"| {r['speedup_vs_fp16']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), args=vars(args), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
