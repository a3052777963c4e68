"""Presets as changes to OrthoConfig's defaults (config.py)."""
import pytest

from libortho.config import PRESETS, OrthoConfig, preset


def test_the_privacy_preset_spends_its_bytes_on_the_low_rank_part():
    config = preset("privacy", forget_source="records")
    assert config.ortho_budget == PRESETS["privacy"]["ortho_budget"] and config.lowrank_share == 1.0
    assert config.sieve_private_weight == PRESETS["privacy"]["sieve_private_weight"] > 0


def test_a_sparse_ratio_given_alone_replaces_the_presets_byte_budget():
    assert preset("privacy", forget_source="records", ortho_ratio=0.05).ortho_budget is None
    both = preset("privacy", forget_source="records", ortho_ratio=0.05, ortho_budget=0.1)
    assert both.ortho_budget == 0.1 and both.ortho_ratio == 0.05  # the byte budget wins in decompose


@pytest.mark.parametrize("source", ["none", "free"])
def test_preset_fields_that_need_forget_texts_are_dropped_without_them(source):
    config = preset("privacy", forget_source=source)
    assert config.sieve_private_weight == 0.0
    with pytest.raises(ValueError, match="sieve_private_weight needs private texts"):
        preset("privacy", forget_source=source, sieve_private_weight=30.0)  # asked for: refused, not dropped


def test_the_quality_preset_is_the_defaults_and_unknown_presets_are_refused():
    assert preset("quality") == OrthoConfig()
    with pytest.raises(ValueError, match="preset 'fast' is not known; choose one of quality, privacy"):
        preset("fast")
