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
