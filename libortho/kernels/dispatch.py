"""Dispatch of ``dual_stream_linear``: picks the kernel and its config for a call, checks
that the kernel takes the layer's layout (else the PyTorch fallback), sizes split-K and the
ortho chunk (launch.py) and launches the Triton kernel (triton_kernels.py).

Scalar alpha == 0 takes the base-only kernel variant (the ortho buffers are not read).

Kernel v3 (tc.py, 2 <= M <= 64 token rows on layers whose layout accepts it:
``KernelLayout.tc_reason`` is None) is the default for those rows: its configs come from the
tc table (configs.py), whose entries keep the previous path where that won the tuning race,
and batch 1 keeps the v2 decode kernel. ``LIBORTHO_KERNEL_V3=0`` in the environment or
``set_v3(False)`` restores the previous path for every M (v2 decode kernel, v1 kernels,
tuned_configs.json) exactly; a call given an explicit ``config`` with ``kernel="tc"`` runs v3
either way. GPU correctness: ``tests/gpu/test_kernels_gpu.py`` (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional, Union

import torch

from .configs import (TC_MAX_M, TC_MIN_M, Config, default_config, select_config,
                      select_tc_config)
from .launch import auto_e, choose_split, interpret_mode, split_buffers
from .layout import KernelLayout, get_layout
from ..packing import container_bits
from .reference import reference_dual_stream

Alpha = Union[float, int, torch.Tensor]

try:  # Triton is optional (CPU-only installs may lack it).
    import triton
    from . import triton_kernels as _tk
    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _tk = None
    _HAS_TRITON = False


def _env_flag(name: str, default: bool) -> bool:
    """The environment's on/off switch ``name`` (1/true/on/yes, 0/false/off/no); unset or
    empty gives ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    return default


V3_ENABLED = _env_flag("LIBORTHO_KERNEL_V3", default=True)


def set_v3(enabled: bool) -> None:
    """Switch kernel v3 (tc.py, 2–64 token rows, default dispatch) on or off for this
    process. On by default; ``LIBORTHO_KERNEL_V3=0`` switches it off at import."""
    global V3_ENABLED
    V3_ENABLED = bool(enabled)


def available() -> bool:
    """Triton importable and a CUDA device present (or the Triton interpreter enabled)."""
    return _HAS_TRITON and (torch.cuda.is_available() or interpret_mode())


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def supports(layer: Any) -> bool:
    """Whether the Triton kernels handle this layer's storage (else the torch fallback)."""
    try:
        cb = container_bits(int(layer.bits))
    except ValueError:
        return False
    g = int(layer.group_size)
    return _pow2(g) and g >= 32 // cb


def torch_dual_stream(x: torch.Tensor, layer: Any, alpha: Alpha = 0.0) -> torch.Tensor:
    """Fallback: dequantize to fp32, dense matmuls, result in x.dtype. Shapes as the kernel."""
    if not isinstance(alpha, torch.Tensor) and float(alpha) == 0.0:
        alpha = 0.0
    return reference_dual_stream(x, layer, alpha, dtype=torch.float32).to(x.dtype)


def _alpha_args(alpha: Alpha, m: int, device: torch.device):
    """-> (has_ortho_from_alpha, alpha_vec or None, scalar alpha)."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(device=device, dtype=torch.float32)
        a = a.expand(m) if a.dim() == 0 else a.reshape(-1)
        if a.numel() != m:
            raise ValueError(f"per-row alpha has {a.numel()} values for {m} rows")
        return True, a.contiguous(), 0.0
    a = float(alpha)
    return a != 0.0, None, a


def _check_config(cfg: Config, cbits: int, group_size: int) -> None:
    epw = 32 // cbits
    for key in ("BM", "BN", "BK"):
        if not _pow2(int(cfg[key])):
            raise ValueError(f"config {key}={cfg[key]} must be a power of two")
    if int(cfg.get("E", 0)) and not _pow2(int(cfg["E"])):
        raise ValueError(f"config E={cfg['E']} must be a power of two (or 0 = automatic)")
    if int(cfg["BK"]) % epw:
        raise ValueError(f"BK={cfg['BK']} must be a multiple of {epw} codes per word")
    if cfg["kernel"] == "gemm" and min(int(cfg["BM"]), int(cfg["BN"])) < 16:
        raise ValueError("gemm kernel needs BM, BN >= 16 (tl.dot)")
    join = bool(cfg.get("JOIN", True)) and cbits in (4, 8)
    if cfg["kernel"] == "gemm" and not join and int(cfg["BK"]) // epw < 16:
        raise ValueError(f"gemm kernel without JOIN needs BK >= {16 * epw} (tl.dot depth)")
    if (cfg["kernel"] == "gemm" and cfg.get("ORTHO", "auto") == "tile"
            or cfg["kernel"] == "gemm" and cfg.get("ORTHO", "auto") == "auto"
            and int(cfg["BM"]) > 16) and 0 < int(cfg.get("E", 0)) < 16:
        raise ValueError("one-hot ortho scatter (tl.dot) needs E >= 16")
    if cfg["kernel"] == "gemv" and int(cfg["BM"]) not in (1, 2):
        raise ValueError("gemv kernel handles BM = 1 or 2 rows per program")


def dual_stream_linear(x: torch.Tensor, layer: Any, alpha: Alpha = 0.0, *,
                       out: Optional[torch.Tensor] = None,
                       config: Optional[Config] = None, lowrank: bool = False) -> torch.Tensor:
    """Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + bias.

    x: [..., in_features] fp16/bf16 (fp32 accepted); alpha: float, or a tensor with one value
    per flattened token row (0-d tensors broadcast); out: optional [rows, out_features]
    contiguous tensor of x.dtype to write into (used by tests to poison outputs);
    config: tile config override (see configs.py). Returns [..., out_features] in x.dtype.
    Accumulation is fp32. Exception: the v2 decode kernel (``kernel="gemv2"``, the tuned
    default for 1–4 fp16 token rows on symmetric 4-bit layers) forms each 32-bit word's 8
    products as fp16 pairs (4 HFMA2 on (c − z)/16, finite for |x| < 32752) before summing them
    in fp32 (docs/kernel_notes.md).
    lowrank: also add alpha·(X·Aᵀ)·Bᵀ of the layer's low-rank part (``ortho_A`` [r, K],
    ``ortho_B`` [N, r]; nothing when absent or r = 0): fused into the v3 kernel's epilogue
    (X·Aᵀ is one thin GEMM before it), two thin GEMMs after the kernel on other paths. False
    (default): the caller adds it (as OrthoLinear.forward does today).
    """
    k, n = int(layer.in_features), int(layer.out_features)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    if not (available() and supports(layer)):
        y = torch_dual_stream(x, layer, alpha)
        if lowrank:
            y = y + _lowrank_torch(x.reshape(-1, k), layer, alpha).reshape(y.shape).to(y.dtype)
        if out is not None:
            out.copy_(y.reshape(out.shape))
            return out.reshape(*x.shape[:-1], n)
        return y
    lay: KernelLayout = get_layout(layer)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    use_ortho, avec, ascalar = _alpha_args(alpha, m, x.device)
    use_ortho = use_ortho and lay.nnz > 0
    rank = _rank(layer) if lowrank and (avec is not None or ascalar != 0.0) else 0
    if config is None and V3_ENABLED and TC_MIN_M <= m <= TC_MAX_M:
        base_only = not use_ortho and rank == 0
        config = select_tc_config(m, n, k, int(layer.group_size), base_only=base_only)
    bias = getattr(layer, "bias", None)
    if config is not None and config.get("kernel") == "tc":
        if _tc_ok(lay, x2):
            _launch_tc(x2, layer, lay, dict(config), y, bias, use_ortho, avec, ascalar, rank)
            return y.reshape(*x.shape[:-1], n)
        config = None  # layout or call the tc kernel refuses: the previous path's config
    cfg = _call_config(config, lay, layer, x2)
    if cfg["kernel"] == "gemv2":
        _launch_v2(x2, layer, lay, cfg, y, bias, use_ortho, avec, ascalar)
    else:
        _launch_v1(x2, layer, lay, cfg, y, bias, use_ortho, avec, ascalar)
    if rank:
        y += _lowrank_torch(x2, layer, avec if avec is not None else ascalar).to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def _rank(layer: Any) -> int:
    a = getattr(layer, "ortho_A", None)
    return 0 if a is None else int(a.shape[0])


def _lowrank_torch(x2: torch.Tensor, layer: Any, alpha: Alpha) -> torch.Tensor:
    """alpha·(X·Aᵀ)·Bᵀ [M, N] with two thin GEMMs (paths without the fused epilogue)."""
    if _rank(layer) == 0:
        return torch.zeros(x2.shape[0], int(layer.out_features), dtype=x2.dtype, device=x2.device)
    low = (x2 @ layer.ortho_A.to(x2.dtype).t()) @ layer.ortho_B.to(x2.dtype).t()
    if isinstance(alpha, torch.Tensor):
        return low * alpha.to(low.dtype).reshape(-1, 1)
    return low * float(alpha)


def _tc_ok(lay: KernelLayout, x2: torch.Tensor) -> bool:
    """The tc kernel takes the call: the layout was accepted when prepared (layout.tc_reason),
    x is fp16/bf16 with unit column stride, 2 <= M <= 64."""
    return (lay.tc_reason is None and x2.dtype in (torch.float16, torch.bfloat16)
            and TC_MIN_M <= x2.shape[0] <= TC_MAX_M)


def tc_entries_per_iter(nnz: int, n: int, split: int, iters: int) -> int:
    """Ortho entries per row per K iteration of the tc kernel: the mean per row per split
    plus one standard deviation (binomial counts), spread over the split's K iterations,
    rounded up to a power of two in [1, 8]; rows longer than that go to the tail loop."""
    mean = nnz / max(1, n) / max(1, split)
    need = (mean + math.sqrt(mean)) / max(1, iters)
    e = 1
    while e < need and e < 8:
        e *= 2
    return e


def tc_uses_h2(lay: KernelLayout, x2: torch.Tensor, cfg: Config) -> bool:
    """Whether a tc launch takes the fp16 dequantisation (inline PTX ``tc._h2_dequant8``):
    fp16 x, a constant integer zero point in [0, 15], the config's H2 not off, and a GPU
    (the interpreter cannot run inline PTX; it takes the fp32 path)."""
    z = lay.zconst
    return (x2.dtype == torch.float16 and z is not None and float(z).is_integer()
            and 0 <= z <= 15 and bool(cfg.get("H2", True)) and not interpret_mode())


def _launch_tc(x2, layer, lay, cfg, y, bias, use_ortho, avec, ascalar, rank) -> None:
    """Launch ``_tc_kernel`` (tc.py) into y [M, N]; rank > 0 fuses the low-rank part."""
    m, k = x2.shape
    n, g = int(layer.out_features), int(layer.group_size)
    bm, bn, bk = int(cfg["BM"]), int(cfg["BN"]), int(cfg["BK"])
    if bm not in (16, 32, 64) or not _pow2(bn) or bn < 16 or not _pow2(bk) or bk < 32:
        raise ValueError(f"tc config needs BM in 16/32/64, BN >= 16 and BK >= 32 powers of two: {cfg}")
    if not cfg.get("WIDE", False):  # one group per K tile: Triton 3.6 failed to compile
        bk = min(bk, g)                # per-word scales into a wgmma operand (kernel_notes v2)
    while k % bk:  # K tiles need no masks (K % 32 == 0 is checked when the layer is prepared)
        bk //= 2
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    unit = max(bk, lay.kb) if use_ortho else bk  # split boundaries on whole ortho K blocks
    split = choose_split(cfg.get("SPLIT", 0), m_tiles * n_tiles, k, bk, x2.device)
    kps = triton.cdiv(triton.cdiv(k, split), unit) * unit
    split = triton.cdiv(k, kps)
    ws, cnt = split_buffers(m_tiles * n_tiles, split, bm, bn, y, x2.device)
    eo = int(cfg.get("E", 0)) or tc_entries_per_iter(lay.nnz, n, split, kps // bk)
    if not _pow2(eo):
        raise ValueError(f"tc config E={eo} must be a power of two (or 0 = automatic)")
    xt = x2.t().contiguous() if use_ortho and bool(cfg.get("XT", True)) else x2
    t, lb = y, y
    if rank:
        t = x2 @ layer.ortho_A.to(x2.dtype).t()  # [M, R]: the thin GEMM before the launch
        lb = layer.ortho_B if layer.ortho_B.is_contiguous() else layer.ortho_B.contiguous()
    z = float(lay.zconst) if lay.zconst is not None else 0.0
    h2 = tc_uses_h2(lay, x2, cfg)
    _tk._tc_kernel[(m_tiles, n_tiles, split)](
        x2, xt, lay.qw, layer.scales, layer.zeros, bias if bias is not None else y,
        lay.kptr, lay.ocol, lay.oval, avec if avec is not None else y, t, lb, y, ws, cnt,
        ascalar, z, _ONEBITS, _half2_bits(-(64.0 + z / 16.0)), _half2_bits(-(4.0 + z / 16.0)),
        m, n, lay.kw, int(layer.scales.shape[1]), rank, x2.stride(0), y.stride(0), kps, split,
        max(1, lay.kb),
        BM=bm, BN=bn, BK=bk, GS=g, ZCONST=lay.zconst is not None, H2=h2,
        HAS_BIAS=bias is not None, HAS_ORTHO=use_ortho, HAS_LR=rank > 0,
        ALPHA_VEC=avec is not None, EO=eo, XT=xt is not x2, EVEN_M=m % bm == 0,
        USE_SPLIT=split > 1, DOT_F32=interpret_mode() and x2.dtype == torch.bfloat16,
        STAGES=int(cfg.get("STAGES", 3)), num_warps=int(cfg["num_warps"]), num_stages=1)


def _call_config(config: Optional[Config], lay: KernelLayout, layer: Any, x2: torch.Tensor) -> Config:
    """The tile config of one call: the override, else the table's (or heuristic) config for
    (M, N, K, group), adjusted to what the chosen kernel takes on this layout."""
    m, k = x2.shape
    n, g = int(layer.out_features), int(layer.group_size)
    cfg = dict(config) if config is not None else select_config(m, n, k, g)
    if cfg["kernel"] == "gemv2" and not _v2_supported(cfg, lay, layer, x2):
        cfg = default_config(m, n, k, g, v2=False)  # v1 decode kernel or gemm
    join = cfg["kernel"] == "gemm" and bool(cfg.get("JOIN", True)) and lay.cbits in (4, 8)
    if join and int(cfg["BK"]) > g:  # one group per K tile on the joined path (Triton 3.6
        cfg["BK"] = g                # cannot compile per-word scales into a wgmma B operand)
    if cfg["kernel"] == "gemm" and not join:  # slot-order dots need depth BK/EPW >= 16
        cfg["BK"] = max(int(cfg["BK"]), 16 * (32 // lay.cbits))
    return cfg


def _launch_v1(x2, layer, lay, cfg, y, bias, use_ortho, avec, ascalar) -> None:
    """Launch the v1 FMA decode (``kernel="gemv"``) or tensor-core GEMM kernel into y [M, N]."""
    m, k = x2.shape
    n, g = int(layer.out_features), int(layer.group_size)
    join = cfg["kernel"] == "gemm" and bool(cfg.get("JOIN", True)) and lay.cbits in (4, 8)
    _check_config(cfg, lay.cbits, g)
    bm, bn, bk = int(cfg["BM"]), int(cfg["BN"]), int(cfg["BK"])
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = choose_split(cfg.get("SPLIT", 0), m_tiles * n_tiles, k, bk, x2.device)
    kps = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, kps)  # no empty splits
    ws, cnt = split_buffers(m_tiles * n_tiles, split, bm, bn, y, x2.device)
    ortho_rows = cfg["kernel"] == "gemv" or cfg.get("ORTHO", "auto") == "rows" or (
        cfg.get("ORTHO", "auto") == "auto" and bm <= 16)
    e = int(cfg.get("E", 0)) or auto_e(lay.nnz, n, split, bn, ortho_rows)
    common = dict(BM=bm, BN=bn, BK=bk, GS=g, CBITS=lay.cbits, ZCONST=lay.zconst is not None,
                  HAS_BIAS=bias is not None, HAS_ORTHO=use_ortho, ALPHA_VEC=avec is not None,
                  E=e, USE_SPLIT=split > 1, EVEN=(n % bn == 0 and k % bk == 0),
                  num_warps=int(cfg["num_warps"]),
                  num_stages=int(cfg["num_stages"]))
    args = (x2, lay.qw, layer.scales, layer.zeros, bias if bias is not None else y,
            layer.ortho_crow, lay.col, layer.ortho_val, avec if avec is not None else y, y,
            ws, cnt, ascalar, lay.zconst or 0.0, _ONEBITS, m, n, k, lay.kw,
            int(layer.scales.shape[1]), x2.stride(0), y.stride(0), kps, split)
    grid = (m_tiles, n_tiles, split)
    if cfg["kernel"] == "gemv":
        xpf = (lay.cbits == 4 and x2.dtype in (torch.float16, torch.bfloat16) and k % 2 == 0
               and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0
            and layer.scales.is_contiguous())
        _tk._gemv_kernel[grid](*args, FMA=True, XPF=xpf, XBF16=x2.dtype == torch.bfloat16,
                               **common)
    else:
        dot_f32 = interpret_mode() and x2.dtype == torch.bfloat16  # interpreter bf16 dot bug
        _tk._gemm_kernel[grid](*args, FMA=False, SWAP=bool(cfg.get("SWAP", False)), JOIN=join,
                               DOT_F32=dot_f32, ORTHO_ROWS=ortho_rows, **common)


_ONEBITS = 0x3F800000  # bit pattern of 1.0f (see codes._codes)


def _v2_supported(cfg: Config, lay: KernelLayout, layer: Any, x2: torch.Tensor) -> bool:
    """Whether the v2 decode kernel handles this call: nibble containers with a constant
    (symmetric) zero point, fp16/bf16 x with 4-byte aligned rows, at most 4 rows per program,
    and K a whole number of the config's K tiles (no K masks in the v2 kernel)."""
    g = int(layer.group_size)
    k = int(layer.in_features)
    bkw = int(cfg.get("GPT", 1)) * g // 8
    return (lay.cbits == 4 and lay.zconst is not None and float(lay.zconst).is_integer()
            and 0 <= lay.zconst <= 15 and g >= 32 and _pow2(g)
            and x2.dtype in (torch.float16, torch.bfloat16) and k % 8 == 0
            and lay.kw * 8 == k and bkw > 0 and lay.kw % bkw == 0
            and int(cfg["BM"]) in (1, 2, 4) and _pow2(int(cfg["BN"]))
            and _pow2(int(cfg.get("GPT", 1)))
            and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0
            and layer.scales.is_contiguous())


@functools.lru_cache(maxsize=64)
def _half2_bits(v: float) -> int:
    """int32 holding the fp16 value v in both halves (signed, as Triton passes i32)."""
    h = int(torch.tensor(v, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF
    w = h | (h << 16)
    return w - (1 << 32) if w >= 1 << 31 else w


def _launch_v2(x2, layer, lay, cfg, y, bias, use_ortho, avec, ascalar):
    """Launch ``_gemv2_kernel`` (see ``_v2_supported`` for what it accepts)."""
    m, k = x2.shape
    n = int(layer.out_features)
    g = int(layer.group_size)
    bm, bn, gpt = int(cfg["BM"]), int(cfg["BN"]), int(cfg.get("GPT", 1))
    bkw = gpt * g // 8
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = choose_split(cfg.get("SPLIT", 0), m_tiles * n_tiles, k, 8 * bkw, x2.device)
    kpsw = triton.cdiv(triton.cdiv(lay.kw, split), bkw) * bkw
    split = triton.cdiv(lay.kw, kpsw)
    ws, cnt = split_buffers(m_tiles * n_tiles, split, bm, bn, y, x2.device)
    # automatic E capped at 16 for v2: [BM, BN, E] gathers of 32 slots per row cost +6 µs on
    # 8192² at 1 % (H200), more than a second E-chunk iteration for long rows
    e = int(cfg.get("E", 0)) or min(16, auto_e(lay.nnz, n, split, bn, True))
    z = float(lay.zconst)
    gpu = not interpret_mode()  # inline PTX (fp16x2 math, vector/scale loads) on GPUs only
    h2 = x2.dtype == torch.float16 and bool(cfg.get("H2", True)) and gpu
    # 16-byte vector loads of x need 16-byte aligned rows; the inline scale load reads fp16
    xvec = (gpu and bool(cfg.get("XVEC", True)) and x2.data_ptr() % 16 == 0
            and (x2.stride(0) * x2.element_size()) % 16 == 0)
    sbc = gpu and layer.scales.dtype == torch.float16 and layer.scales.is_contiguous()
    _tk._gemv2_kernel[(m_tiles, n_tiles, split)](
        x2, lay.qw, layer.scales, bias if bias is not None else y, layer.ortho_crow, lay.col,
        layer.ortho_val, avec if avec is not None else y, y, ws, cnt, ascalar, _ONEBITS,
        _half2_bits(-(64.0 + z / 16.0)), _half2_bits(-(4.0 + z / 16.0)), z, m, n, lay.kw,
        int(layer.scales.shape[1]), x2.stride(0), y.stride(0), kpsw, split,
        BM=bm, BN=bn, GPT=gpt, GS=g, HAS_BIAS=bias is not None, HAS_ORTHO=use_ortho,
        ALPHA_VEC=avec is not None, E=e, USE_SPLIT=split > 1, H2=h2,
        XBF16=x2.dtype == torch.bfloat16, XVEC=xvec, SBC=sbc, STAGES=int(cfg.get("STAGES", 1)),
        OPF=bool(cfg.get("OPF", False)) and bm == 1, num_warps=int(cfg["num_warps"]),
        num_stages=1)
    return y


def prepare(module: torch.nn.Module) -> int:
    """Build the kernel layout of every OrthoLinear-like submodule (has ``qweight`` and
    ``ortho_crow``). Call before CUDA-graph capture. Returns the number of layers prepared."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "qweight") and hasattr(sub, "ortho_crow") and supports(sub):
            get_layout(sub)
            count += 1
    return count
