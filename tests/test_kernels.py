"""Fused dual-stream kernels vs a float64 PyTorch reference, on the CPU via Triton's
interpreter (TRITON_INTERPRET=1). Skipped when Triton is not installed.

Install for CPU-only CI: ``pip install triton`` (no dependencies; it does not pull a CUDA
torch). Small shapes only: the whole file runs in well under two minutes on two cores.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernels are decorated
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import libortho.kernels.dispatch as K  # noqa: E402
from libortho.kernels import codes, gemv2, ortho, tc, tile, v1  # noqa: E402
from libortho.kernels import triton_kernels as TK  # noqa: E402
from libortho.kernels.synthetic import random_layer  # noqa: E402

if not torch.cuda.is_available():  # re-decorate in interpreter mode if imported earlier
    for _mod in (codes, tile, ortho, v1, gemv2, tc):  # helpers before their callers
        importlib.reload(_mod)
    TK = importlib.reload(TK)
    K._tk = TK
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _layer(k: int, n: int, seed: int, **kw):
    return random_layer(k, n, generator=_gen(seed), **kw).to(DEV)


def _check(layer, x, alpha, cfg=None, dtype_tol=None):
    """Run the kernel into a NaN-poisoned output and compare with the float64 reference."""
    rows = x.reshape(-1, layer.in_features).shape[0]
    out = torch.full((rows, layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    y = K.dual_stream_linear(x, layer, alpha, out=out, config=cfg)
    ref = K.reference_dual_stream(x, layer, alpha)
    assert y.shape == ref.shape
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    tol = dtype_tol or (1.5e-2 if x.dtype == torch.bfloat16 else 3e-3)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    return y


GEMV1 = dict(kernel="gemv", BM=1, BN=16, BK=64, num_warps=2, num_stages=2, E=8, SPLIT=1)
GEMV2 = dict(kernel="gemv", BM=2, BN=16, BK=32, num_warps=2, num_stages=2, E=8, SPLIT=3)
GEMM_SWAP = dict(kernel="gemm", BM=16, BN=32, BK=128, num_warps=4, num_stages=2, E=16,
                 SWAP=True, JOIN=True, SPLIT=2)
GEMM_SLOT = dict(kernel="gemm", BM=16, BN=16, BK=128, num_warps=4, num_stages=2, E=16,
                 SWAP=False, JOIN=False, SPLIT=1)


@pytest.mark.parametrize("case", [
    # (cfg, k, n, rows, group, symmetric, bias, density, heavy, alpha kind, x dtype)
    (GEMV1, 77, 45, 1, 32, True, True, 0.05, 0, "one", torch.float16),
    (GEMV2, 301, 33, 3, 64, False, False, 0.05, 1, "rows", torch.float16),
    (GEMV1, 256, 48, 2, 128, False, True, 0.02, 0, "half", torch.bfloat16),
    (GEMM_SWAP, 300, 70, 5, 128, False, False, 0.03, 1, "half", torch.bfloat16),
    (GEMM_SWAP, 256, 64, 17, 32, True, True, 0.04, 0, "rows", torch.float16),
    (GEMM_SLOT, 200, 40, 16, 64, True, True, 0.0, 0, "one", torch.float16),
    (dict(GEMM_SWAP, ORTHO="tile", SPLIT=3), 260, 50, 20, 32, False, True, 0.05, 1, "rows",
     torch.float16),
])
def test_kernel_matches_reference(case):
    cfg, k, n, rows, g, sym, bias, dens, heavy, akind, dt = case
    layer = _layer(k, n, seed=k * 7 + n, group_size=g, symmetric=sym, bias=bias,
                   density=dens, heavy_rows=heavy)
    gen = _gen(rows)
    x = torch.randn(rows, k, generator=gen).to(DEV, dt)
    alpha = {"one": 1.0, "half": 0.5,
             "rows": torch.rand(rows, generator=gen).to(DEV)}[akind]
    _check(layer, x, alpha, cfg)


def test_heavy_row_and_split_balance():
    """One row holds every column (CSR row of length K) next to light rows, split-K on."""
    layer = _layer(130, 24, seed=3, group_size=32, density=0.01, heavy_rows=2, bias=True)
    x = torch.randn(2, 130, generator=_gen(4)).to(DEV, torch.float16)
    _check(layer, x, 1.0, dict(GEMV2, SPLIT=4))
    _check(layer, x.repeat(8, 1), 1.0, dict(GEMM_SWAP, BN=16, SPLIT=3))


def test_alpha_zero_never_reads_ortho():
    """Scalar alpha = 0 takes the base-only path: NaN ortho values must not leak in."""
    layer = _layer(96, 32, seed=5, group_size=32, density=0.1)
    layer.ortho_val.fill_(float("nan"))
    x = torch.randn(3, 96, generator=_gen(6)).to(DEV, torch.float16)
    for cfg in (GEMV2, dict(GEMM_SWAP, BN=16)):
        y = K.dual_stream_linear(x, layer, 0.0, config=cfg)
        assert torch.isfinite(y).all()
        ref = K.reference_dual_stream(x, layer, 0.0)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(bits):
    layer = _layer(200, 40, seed=bits, bits=bits, group_size=64, symmetric=False,
                   density=0.03, bias=True)
    x = torch.randn(2, 200, generator=_gen(bits)).to(DEV, torch.float16)
    _check(layer, x, 1.0, dict(GEMV2, BK=64))
    codes_per_word = 32 // (4 if bits == 3 else bits)
    _check(layer, x.repeat(9, 1), 0.5, dict(GEMM_SWAP, BN=16, BK=16 * codes_per_word))


def test_default_configs_3d_input_and_zero_d_alpha():
    """config=None (table/heuristics, automatic split) on [batch, seq, K] inputs."""
    layer = _layer(264, 72, seed=11, group_size=64, density=0.02, bias=True)
    for rows in (1, 6):
        x = torch.randn(2, rows, 264, generator=_gen(rows)).to(DEV, torch.float16)
        y = _check(layer, x, torch.tensor(0.75, device=DEV))
        assert y.shape == (2, rows, 72)


def test_fallback_for_unsupported_group_size():
    layer = _layer(96, 16, seed=12, group_size=48, density=0.05)
    assert not K.supports(layer)
    x = torch.randn(2, 96, generator=_gen(13)).to(DEV, torch.float16)
    _check(layer, x, 1.0)


def test_layout_cache_tracks_in_place_updates():
    layer = _layer(128, 32, seed=14, group_size=32, density=0.05)
    x = torch.randn(1, 128, generator=_gen(15)).to(DEV, torch.float16)
    _check(layer, x, 1.0, GEMV1)
    first = layer.kernel_layout
    with torch.no_grad():  # load_state_dict-style in-place copies
        layer.qweight.copy_(torch.randint_like(layer.qweight, 0, 256))
        layer.zeros.copy_(torch.rand_like(layer.zeros.float()).half() * 15)
    _check(layer, x, 1.0, GEMV1)
    assert layer.kernel_layout is not first and layer.kernel_layout.zconst is None


def test_ortholinear_integration():
    """If the core layer exists, the kernel must accept it as is."""
    layer_mod = pytest.importorskip("libortho.layer")
    from libortho.kernels.synthetic import as_ortholinear
    src = random_layer(200, 48, group_size=64, density=0.03, bias=True, generator=_gen(16))
    try:
        layer = as_ortholinear(src).to(DEV)
    except Exception as exc:  # constructor signature still moving
        pytest.skip(f"OrthoLinear construction differs: {exc}")
    assert isinstance(layer, layer_mod.OrthoLinear)
    x = torch.randn(3, 200, generator=_gen(17)).to(DEV, torch.float16)
    _check(layer, x, 1.0, GEMV2)


# v2 decode kernel (libortho/kernels/gemv2._gemv2_kernel). The interpreter runs its
# fp32 / tl.load path (inline PTX — fp16x2 dequantisation, vector x loads, scale loads — is
# GPU only: tests/gpu/test_kernels_gpu.py covers it), so these check the indexing: tiles of
# GPT groups, split-K over whole tiles, rows past N and past M, BM = 1 / 2 / 4, the ortho
# slice per split, bias, per-row alpha, bf16 x, and the fallback for layouts it rejects.
V2 = dict(kernel="gemv2", BM=1, BN=16, GPT=1, num_warps=2, num_stages=1, E=8, SPLIT=1)


@pytest.mark.parametrize("case", [
    # (cfg, k, n, rows, group, bits, bias, density, heavy, alpha kind, x dtype)
    (V2, 128, 40, 1, 32, 4, True, 0.05, 0, "one", torch.float16),
    (dict(V2, BM=2, GPT=2, SPLIT=3), 256, 33, 3, 32, 4, False, 0.05, 1, "rows", torch.float16),
    (dict(V2, BM=4, SPLIT=2), 256, 48, 4, 64, 4, True, 0.03, 0, "half", torch.bfloat16),
    (dict(V2, BM=4, BN=32, STAGES=2), 128, 20, 3, 32, 3, False, 0.04, 0, "one",
     torch.float16),
    (dict(V2, OPF=True, SPLIT=2), 128, 40, 1, 32, 4, False, 0.1, 1, "rows", torch.float16),
])
def test_gemv2_matches_reference(case):
    cfg, k, n, rows, g, bits, bias, dens, heavy, akind, dt = case
    layer = _layer(k, n, seed=k + n + rows, group_size=g, bits=bits, symmetric=True,
                   bias=bias, density=dens, heavy_rows=heavy)
    gen = _gen(rows + 100)
    x = torch.randn(rows, k, generator=gen).to(DEV, dt)
    alpha = {"one": 1.0, "half": 0.5,
             "rows": torch.rand(rows, generator=gen).to(DEV)}[akind]
    _check(layer, x, alpha, cfg)
    lay = K.get_layout(layer)
    assert K._v2_supported(cfg, lay, layer, x.reshape(-1, k))


def test_gemv2_falls_back_for_other_layouts():
    """Asymmetric zeros, K not a whole number of tiles: the v1 kernels take the call."""
    layer = _layer(96, 24, seed=21, group_size=32, symmetric=False, density=0.05)
    x = torch.randn(2, 96, generator=_gen(22)).to(DEV, torch.float16)
    assert not K._v2_supported(V2, K.get_layout(layer), layer, x)
    _check(layer, x, 1.0, dict(V2, BM=2))
    layer = _layer(96, 24, seed=23, group_size=64, density=0.05)  # 96 % 64 != 0
    assert not K._v2_supported(V2, K.get_layout(layer), layer, x)
    _check(layer, x, 1.0, V2)


def test_default_config_takes_gemv2():
    """config=None, M <= 4, a layout v2 accepts and no table entry: the v2 kernel runs."""
    layer = _layer(256, 48, seed=24, group_size=64, density=0.03, bias=True)
    for rows in (1, 3):
        cfg = K.default_config(rows, 48, 256, 64)
        assert cfg["kernel"] == "gemv2"
        x = torch.randn(rows, 256, generator=_gen(25 + rows)).to(DEV, torch.float16)
        assert K._v2_supported(cfg, K.get_layout(layer), layer, x)
        _check(layer, x, 1.0)


# Kernel v3 (libortho/kernels/tc.py, ``_tc_kernel``): 2–64 token rows on tensor cores. The
# interpreter runs its fp32-dequantisation path (the fp16x2 inline PTX is GPU only), so these
# check the indexing: BM 16/32/64 with padded / clamped token rows, rows past N, BK below and
# above the group size, split-K on whole ortho K blocks, the in-loop ortho walk and its tail
# (heavy rows), x gathered from x or its transpose (XT), per-row alpha, asymmetric zeros,
# bf16 x, and the fused low-rank part.
TC = dict(kernel="tc", BM=16, BN=16, BK=64, num_warps=4, STAGES=2, E=1, SPLIT=2, XT=True)


def _spy_tc(monkeypatch):
    calls = []
    real = K._launch_tc
    monkeypatch.setattr(K, "_launch_tc", lambda *a, **kw: (calls.append(a[3]), real(*a, **kw)))
    return calls


@pytest.mark.parametrize("case", [
    # (cfg, k, n, rows, group, symmetric, bias, density, heavy, alpha kind, x dtype, rank)
    (TC, 256, 40, 5, 64, True, True, 0.05, 1, "one", torch.float16, 0),
    (dict(TC, XT=False, SPLIT=3, E=2), 512, 33, 3, 32, False, False, 0.04, 1, "rows",
     torch.float16, 0),
    (dict(TC, BK=128, SPLIT=1), 256, 48, 2, 32, True, True, 0.03, 0, "half", torch.bfloat16, 0),
    (dict(TC, BM=64, BN=32), 512, 40, 33, 128, True, False, 0.02, 2, "rows", torch.float16, 0),
    (dict(TC, BM=32), 256, 24, 32, 64, True, False, 0.03, 0, "one", torch.float16, 20),
    (dict(TC, SPLIT=3), 768, 24, 4, 64, True, True, 0.0, 0, "rows", torch.bfloat16, 17),
])
def test_tc_matches_reference(case, monkeypatch):
    cfg, k, n, rows, g, sym, bias, dens, heavy, akind, dt, rank = case
    calls = _spy_tc(monkeypatch)
    layer = _layer(k, n, seed=k + n + rows, group_size=g, symmetric=sym, bias=bias,
                   density=dens, heavy_rows=heavy, rank=rank)
    gen = _gen(rows + 200)
    x = torch.randn(rows, k, generator=gen).to(DEV, dt)
    alpha = {"one": 1.0, "half": 0.5, "rows": torch.rand(rows, generator=gen).to(DEV)}[akind]
    out = torch.full((rows, n), float("nan"), dtype=dt, device=DEV)
    y = K.dual_stream_linear(x, layer, alpha, out=out, config=cfg, lowrank=rank > 0)
    ref = K.reference_dual_stream(x, layer, alpha, lowrank=rank > 0)
    assert calls, "the tc kernel did not run"
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < (1.5e-2 if dt == torch.bfloat16 else 3e-3), err


def test_tc_ortho_partition_by_k_block():
    """layout.kptr: entries of row r with columns in K block b are [kptr[b, r], kptr[b+1, r]),
    also when the stored CSR is not column-sorted within rows (the layout sorts a copy)."""
    from libortho.kernels import layout as L
    layer = _layer(672, 12, seed=31, group_size=32, density=0.2, heavy_rows=1)
    crow = layer.ortho_crow.long()
    for r in range(12):  # reverse every row's entries: the stored CSR is no longer sorted
        a, b = int(crow[r]), int(crow[r + 1])
        layer.ortho_col[a:b] = layer.ortho_col[a:b].flip(0).clone()
        layer.ortho_val[a:b] = layer.ortho_val[a:b].flip(0).clone()
    lay = L.build_layout(layer)
    assert lay.tc_reason is None and lay.kptr.shape == (3 + 1, 12)  # cdiv(672, 256) = 3
    for r in range(12):
        for blk in range(3):
            lo, hi = int(lay.kptr[blk, r]), int(lay.kptr[blk + 1, r])
            c = lay.ocol[lo:hi].long()
            assert ((c >= blk * lay.kb) & (c < (blk + 1) * lay.kb)).all()
            want = (layer.ortho_col[int(crow[r]):int(crow[r + 1])].long() // lay.kb == blk).sum()
            assert hi - lo == int(want)
    x = torch.randn(3, 672, generator=_gen(32)).to(DEV, torch.float16)
    _check(layer, x, 1.0, dict(TC, SPLIT=3))  # the kernel walks the sorted copy


def test_v3_is_on_unless_switched_off(monkeypatch):
    """Kernel v3 is on by default and LIBORTHO_KERNEL_V3=0 switches it off: off, config=None
    never launches the tc kernel."""
    for value, on in ((None, True), ("", True), ("1", True), ("on", True), ("0", False), ("off", False)):
        if value is None:
            monkeypatch.delenv("LIBORTHO_KERNEL_V3", raising=False)
        else:
            monkeypatch.setenv("LIBORTHO_KERNEL_V3", value)
        assert K._env_flag("LIBORTHO_KERNEL_V3", default=True) is on, value
    monkeypatch.setenv("LIBORTHO_KERNEL_V3", "0")
    monkeypatch.setattr(K, "V3_ENABLED", K._env_flag("LIBORTHO_KERNEL_V3", default=True))
    calls = _spy_tc(monkeypatch)
    layer = _layer(256, 32, seed=38, group_size=64, density=0.03)
    for rows in (2, 16, 64):
        _check(layer, torch.randn(rows, 256, generator=_gen(rows)).to(DEV, torch.float16), 1.0)
    assert not calls


def test_tc_dispatch_and_switch(monkeypatch):
    """With v3 on (the default), config=None: M = 1 keeps
    the v2 decode kernel, 2..64 take tc, 65+ the v1 gemm; switching it off restores the
    previous path; layers tc refuses are refused when prepared. (No tuned table: a shape it
    holds would follow its race instead.)"""
    from libortho.kernels import configs
    monkeypatch.setattr(configs, "TC_TABLE", {})
    monkeypatch.setattr(configs, "_tc_read", True)
    calls = _spy_tc(monkeypatch)
    monkeypatch.setattr(K, "V3_ENABLED", True)
    layer = _layer(256, 32, seed=34, group_size=64, density=0.03, bias=True)
    for rows, want in ((1, 0), (2, 1), (64, 1), (65, 0)):
        calls.clear()
        x = torch.randn(rows, 256, generator=_gen(rows)).to(DEV, torch.float16)
        _check(layer, x, 1.0)
        assert len(calls) == want, rows
    monkeypatch.setattr(K, "V3_ENABLED", False)
    calls.clear()
    _check(layer, torch.randn(4, 256, generator=_gen(35)).to(DEV, torch.float16), 1.0)
    assert not calls
    monkeypatch.setattr(K, "V3_ENABLED", True)
    eight = _layer(256, 32, seed=36, bits=8, group_size=64, density=0.03)
    assert K.get_layout(eight).tc_reason is not None
    _check(eight, torch.randn(4, 256, generator=_gen(37)).to(DEV, torch.float16), 1.0,
           dict(TC))  # a tc config on a refused layer falls back to the previous path
    assert not calls


def test_a_shape_the_tc_race_never_saw_follows_the_nearest_tuned_shape(monkeypatch):
    """Untuned (n, k): where the previous path won the race on the tuned shape nearest in
    weight count at that M, v3 gives way to it (None); where tc won, the heuristic tc config."""
    from libortho.kernels import configs
    monkeypatch.setattr(configs, "TC_TABLE", {})
    monkeypatch.setattr(configs, "_tc_read", True)
    prev = dict(kernel="gemv2", BM=4, BN=32)
    tc = dict(kernel="tc", BM=16, BN=128)
    configs.TC_TABLE[(4096, 4096)] = [(4, prev, None), (16, tc, None)]
    configs.TC_TABLE[(8192, 8192)] = [(4, tc, None), (16, tc, None)]
    assert configs.select_tc_config(4, 4096, 4096, 128) == prev  # tuned: its own entry
    assert configs.select_tc_config(4, 6144, 4096, 128) is None  # nearest is 4096², prev won
    assert configs.select_tc_config(16, 6144, 4096, 128) == configs.default_tc_config(16)
    assert configs.select_tc_config(4, 8192, 7168, 128) == configs.default_tc_config(4)  # nearest 8192²
    assert configs.select_tc_config(64, 6144, 4096, 128) == configs.default_tc_config(64)  # past the table


def test_the_base_only_race_picks_the_config_of_calls_that_read_no_ortho(monkeypatch):
    """Entries with ``config_base_only`` give it to base-only calls (scalar alpha 0), the alpha-1
    winner to the others; entries without one give the alpha-1 winner to both; dispatch asks
    for the base-only winner exactly when the kernel reads no ortho part."""
    from libortho.kernels import configs
    prev = dict(kernel="gemm", BM=16, BN=32)
    tc = dict(kernel="tc", BM=64, BN=64)
    monkeypatch.setattr(configs, "TC_TABLE", {})
    configs.set_tc_table([dict(m=64, n=256, k=256, config=tc, config_base_only=prev),
                          dict(m=64, n=512, k=256, config=tc)])
    assert configs.select_tc_config(64, 256, 256, 128) == tc
    assert configs.select_tc_config(64, 256, 256, 128, base_only=True) == prev
    assert configs.select_tc_config(64, 512, 256, 128, base_only=True) == tc
    seen = []
    real = K.select_tc_config
    monkeypatch.setattr(K, "select_tc_config", lambda *a, **kw: seen.append(kw["base_only"]) or real(*a, **kw))
    monkeypatch.setattr(K, "V3_ENABLED", True)
    layer = _layer(256, 32, seed=39, group_size=64, density=0.03)
    x = torch.randn(16, 256, generator=_gen(39)).to(DEV, torch.float16)
    for a in (0.0, 1.0, torch.tensor([0.0, 1.0] * 8)):
        _check(layer, x, a)
    assert seen == [True, False, False]
