"""The layer benchmark's split of a two-part ortho stream (kernel_bench/layers.py); CPU only."""
import pytest

from libortho.kernel_bench.layers import split_for_shape
from libortho.ortho_split import LOWRANK_VALUE_BYTES, SPARSE_ENTRY_BYTES, base_bytes


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (576, 576)])
def test_the_split_of_one_layer_keeps_to_its_bytes(shape, share):
    n, k = shape
    density, rank = split_for_shape(n, k, 0.25, share)
    budget = 0.25 * base_bytes(shape, 4, 128)
    spent = 4 * (n + 1) + LOWRANK_VALUE_BYTES * rank * (n + k) + SPARSE_ENTRY_BYTES * density * n * k
    assert spent <= budget + 1e-6
    if share == 1.0:
        assert density == 0.0 and budget - spent < LOWRANK_VALUE_BYTES * (n + k)  # less than one more rank is left
    else:
        assert budget - spent < 1e-6 * budget  # S takes what L leaves
    if share == 0.0:
        assert rank == 0


def test_4096_square_at_a_quarter_of_its_bytes():
    # base: 4096·2048 codes + 4·4096·32 scale and zero bytes = 8912896 B; 25 % minus 16388 B of row pointers
    # = 2211836 B, at 16384 B per rank: 134
    assert split_for_shape(4096, 4096, 0.25, 1.0) == (0.0, 134)


def test_4bit_codes_buy_the_rank_their_bytes_buy():
    # one rank of 4-bit codes: 2·(2048 code bytes + 4·64 scale and zero bytes) = 4608 B; 2211836 // 4608 = 479
    assert split_for_shape(4096, 4096, 0.25, 1.0, lowrank_bits=4) == (0.0, 479)


def test_a_synthetic_coded_lowrank_layer_is_what_the_codes_kernel_reads():
    import torch
    from libortho.kernels.synthetic import random_layer, with_coded_lowrank
    src = random_layer(256, 128, generator=torch.Generator().manual_seed(0))
    layer = with_coded_lowrank(src, 24, 4, seed=1)
    B, A = layer.lowrank_factors()
    assert layer.ortho_rank == 24 and layer.lowrank_bits == 4 and B.shape == (128, 24) and A.shape == (24, 256)
    assert 0 < A.abs().max() <= 8 * 0.02 / 4 * (1 + 1e-3)  # codes in [0, 15] about the zero 8, scale 0.02 / 4
    assert torch.equal(layer.qweight, src.qweight)


# ---- goals and the GPU command's verdict (benchmarks/bench_decode_v3.py); CPU only ---------

def _rows(n=8192, k=8192, a0=11.0, a1=12.0, i4_4=40.0, a0_4=30.0, f16_16=35.0, a1_16=15.0,
          f16_64=37.0, a1_64=36.0, rows_1=12.2):
    r = [dict(row="a0", n=n, k=k, m=1, us=a0, bytes=34_000_000, gbps=34e6 / (a0 * 1e-6) / 1e9),
         dict(row="a1_1", n=n, k=k, m=1, us=a1, bytes=36_700_000),
         dict(row="a1_1_rows", n=n, k=k, m=1, us=rows_1),
         dict(row="a0", n=n, k=k, m=4, us=a0_4), dict(row="torch_int4", n=n, k=k, m=4, us=i4_4),
         dict(row="fp16", n=n, k=k, m=16, us=f16_16), dict(row="a1_1", n=n, k=k, m=16, us=a1_16),
         dict(row="fp16", n=n, k=k, m=64, us=f16_64), dict(row="a1_1", n=n, k=k, m=64, us=a1_64),
         dict(row="a1_1", n=n, k=k, m=2, error="compile error")]
    return r


def test_goals_of_the_v3_issue():
    from libortho.kernel_bench.report import GOALS, goals
    g = {x["goal"]: x for x in goals(_rows(), 4000.0)}
    assert set(g) == set(GOALS)
    assert g[GOALS[0]]["met"] and abs(g[GOALS[0]]["value"] - 34e6 / 11e-6 / 1e9 / 4000) < 1e-9
    assert abs(g[GOALS[1]]["limit"] - 1.05 * 36.7 / 34.0) < 1e-9 and g[GOALS[1]]["met"]
    assert abs(g[GOALS[2]]["value"] - 0.75) < 1e-9 and g[GOALS[2]]["met"]
    assert abs(g[GOALS[3]]["value"] - 35 / 15) < 1e-9 and g[GOALS[3]]["met"]
    assert g[GOALS[4]]["met"] and not goals(_rows(a1_64=38.0), 4000.0)[4]["met"]
    assert abs(g[GOALS[5]]["value"] - 12.2 / 12.0) < 1e-9 and g[GOALS[5]]["met"]


def _bench_script():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_decode_v3.py")
    spec = importlib.util.spec_from_file_location("bench_decode_v3", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_check_always_gets_its_minimum_time():
    b = _bench_script()
    assert b.check_limit(290) >= 60 and b.check_limit(0) == 60 and b.check_limit(10_000) == 120
    assert 85 <= b.check_limit(420) <= 95


def test_goals_are_unverified_without_a_passing_check(tmp_path):
    import json
    from libortho.kernel_bench.report import goals
    b = _bench_script()
    res = _rows()
    (tmp_path / "bench.json").write_text(json.dumps(dict(
        env=dict(device="card", kernel_v3=True), copy_gbps=4000.0, results=res,
        goals=goals(res, 4000.0))))
    ok = dict(name="tc table m16", ok=True, err=1e-4, tc_h2=True, tc_launches=2)
    verdicts = []
    for cases in ([dict(name="part 0 (no result)", ok=False, err=float("nan"))],
                  [dict(ok, tc_h2=False)],       # passed, but never on the fp16 path
                  [ok, dict(ok, name="v2 m1", tc_h2=False, tc_launches=0)]):
        (tmp_path / "check.json").write_text(json.dumps(dict(device="card", cases=cases)))
        b.summary(str(tmp_path))
        verdicts.append(json.loads((tmp_path / "verdict.json").read_text()))
    (tmp_path / "check.json").unlink()
    b.summary(str(tmp_path))
    verdicts.append(json.loads((tmp_path / "verdict.json").read_text()))
    for v in verdicts[:2] + verdicts[3:]:
        assert not v["verified"]
        assert {x["status"] for x in v["goals"]} == {"UNVERIFIED"}  # all met in _rows
    assert verdicts[2]["verified"] and {x["status"] for x in verdicts[2]["goals"]} == {"MET"}
