import torch



def test_empirical_fisher_is_the_mean_squared_per_sequence_gradient(tokenizer):
    from conftest import tiny_model
    from libortho.calibrate import _nll, empirical_fisher, text_batches

    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    batches = text_batches(tokenizer, ["first sequence of text", "a second, longer sequence of text"], batch_size=2)
    F = empirical_fisher(model, [name], batches)[name]
    W = model.get_submodule(name).weight
    expected = torch.zeros_like(W)
    for text in ["first sequence of text", "a second, longer sequence of text"]:
        ids, mask = text_batches(tokenizer, [text])[0]
        g, = torch.autograd.grad(_nll(model, ids, mask), W)
        expected += g.square() / 2
    assert torch.allclose(F, expected, rtol=1e-4, atol=1e-12)
    assert not W.requires_grad or W.grad is None
