"""Presets as changes to OrthoConfig's defaults (config.py)."""
import pytest

from libortho.config import ADDED_DEFAULTS, PRESETS, OrthoConfig, preset


def test_the_privacy_preset_spends_its_bytes_on_the_low_rank_part():
    config = preset("privacy", forget_source="records")
    assert config.ortho_budget == PRESETS["privacy"]["ortho_budget"] and config.lowrank_share == 1.0
    assert config.lowrank_bits == 4 and preset("quality").lowrank_bits == 16  # L as 4-bit codes
    assert config.sieve_private_weight == PRESETS["privacy"]["sieve_private_weight"] > 0
    assert config.sieve_private_inputs == "finetuned"  # H_priv of the sieve and L on the fine-tune's activations
    assert config.lowrank_target == "propagated"  # L fitted on the inputs alpha 1 gives each layer


def test_a_sparse_ratio_given_alone_replaces_the_presets_byte_budget():
    sparse = preset("privacy", forget_source="records", ortho_ratio=0.05)
    assert sparse.ortho_budget is None and sparse.lowrank_target == "residual"  # no L to fit on alpha 1's inputs
    assert preset("privacy", forget_source="records", lowrank_share=0.5).lowrank_target == "residual"
    assert preset("privacy", forget_source="records", sieve_private_inputs="base").lowrank_target == "residual"
    with pytest.raises(ValueError, match="lowrank_share=1"):  # asked for: refused, not dropped
        preset("privacy", forget_source="records", lowrank_share=0.5, lowrank_target="propagated")
    both = preset("privacy", forget_source="records", ortho_ratio=0.05, ortho_budget=0.1)
    assert both.ortho_budget == 0.1 and both.ortho_ratio == 0.05  # the byte budget wins in decompose


@pytest.mark.parametrize("source", ["none", "free"])
def test_preset_fields_that_need_forget_texts_are_dropped_without_them(source):
    config = preset("privacy", forget_source=source)
    assert config.sieve_private_weight == 0.0 and config.sieve_private_inputs == "base"
    with pytest.raises(ValueError, match="sieve_private_weight needs private texts"):
        preset("privacy", forget_source=source, sieve_private_weight=30.0)  # asked for: refused, not dropped


def test_the_quality_preset_is_the_defaults_and_unknown_presets_are_refused():
    assert preset("quality") == OrthoConfig()
    with pytest.raises(ValueError, match="preset 'fast' is not known; choose one of quality, privacy"):
        preset("fast")


def test_forget_target_is_checked_and_a_config_that_does_not_use_it_hashes_as_before():
    from libortho.workfolder import fingerprint

    assert OrthoConfig().forget_target == "base_inputs"
    with pytest.raises(ValueError, match="forget_target='p' is not known; choose one of base_inputs, public_activations"):
        OrthoConfig(forget_source="records", forget_target="p")
    for source in ("none", "free"):
        with pytest.raises(ValueError, match="forget_target='public_activations' runs P on the forget texts"):
            OrthoConfig(forget_source=source, forget_target="public_activations")
    # A manifest written before the field existed loads with the default; a work folder started then resumes.
    old = {k: v for k, v in OrthoConfig(forget_source="records").to_dict().items() if k not in ADDED_DEFAULTS}
    assert OrthoConfig(**old) == OrthoConfig(forget_source="records")
    assert OrthoConfig(**old).fingerprint_dict() == old
    new = OrthoConfig(forget_source="records", forget_target="public_activations")
    assert new.fingerprint_dict()["forget_target"] == "public_activations"
    assert fingerprint(new, "t", ["r"], [None]) != fingerprint(OrthoConfig(**old), "t", ["r"], [None])


def test_lowrank_bits_is_checked_and_the_float_default_hashes_as_before():
    with pytest.raises(ValueError, match="lowrank_bits=3 is not supported; choose one of 16, 8, 4"):
        OrthoConfig(lowrank_bits=3)
    assert "lowrank_bits" not in OrthoConfig().fingerprint_dict()
    assert OrthoConfig(lowrank_bits=4).fingerprint_dict()["lowrank_bits"] == 4


def test_sieve_private_inputs_is_checked():
    with pytest.raises(ValueError, match="sieve_private_inputs='p' is not known; choose one of base, finetuned"):
        OrthoConfig(forget_source="records", sieve_private_weight=1.0, sieve_private_inputs="p")
    with pytest.raises(ValueError, match="set sieve_private_weight above 0"):
        OrthoConfig(forget_source="records", sieve_private_inputs="finetuned")
    assert "sieve_private_inputs" not in OrthoConfig().fingerprint_dict()
