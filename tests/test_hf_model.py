from types import SimpleNamespace

import pytest


@pytest.mark.parametrize(
    "pad, eos, expected",
    [(5, 7, 5), (None, 7, 7), (None, [9, 4], 4), (None, None, 0), (0, 3, 0), (None, [], 0)],
)
def test_pad_id_is_the_pad_token_else_eos_else_zero(pad, eos, expected):
    from libortho.hf_model import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_decoder_blocks_and_linear_weights_of_a_tiny_llama():
    from conftest import tiny_model
    from libortho.hf_model import decoder_blocks, linear_weight, replace_submodule, target_linears
    from torch import nn

    model = tiny_model("llama")
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == model.config.num_hidden_layers
    linears = target_linears(blocks[0])
    assert set(linears) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert set(target_linears(blocks[0], include=r"mlp\.")) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    W = linear_weight(linears["mlp.down_proj"])
    assert tuple(W.shape) == (linears["mlp.down_proj"].out_features, linears["mlp.down_proj"].in_features)
    new = nn.Identity()
    replace_submodule(blocks[0], "mlp.down_proj", new)
    assert blocks[0].mlp.down_proj is new


def test_a_model_without_known_blocks_is_refused_by_name():
    from libortho.hf_model import decoder_blocks
    from torch import nn

    with pytest.raises(ValueError, match="cannot find the decoder blocks of Linear"):
        decoder_blocks(nn.Linear(2, 2))
