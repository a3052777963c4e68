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


def test_hessians_are_exact_per_layer_over_many_batches(tokenizer):
    """Shared accumulation (q/k/v, gate/up) must never mistake a new activation for the last one,
    even when the allocator hands it the freed memory of an earlier one of the same shape."""
    from conftest import TEXT, tiny_model
    from libortho.calibrate import HessianCollector, calibration_windows, capture_block_inputs, decoder_blocks, run_block, target_linears

    model = tiny_model("llama")
    windows = calibration_windows(tokenizer, TEXT, 8 * 32, 32)
    block = decoder_blocks(model)[1][0]
    linears = target_linears(block)
    inputs = capture_block_inputs(model, windows, batch_size=2)
    seen = {name: [] for name in linears}
    handles = [m.register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].detach().clone()))
               for name, m in linears.items()]
    collector = HessianCollector(linears)
    run_block(block, inputs)
    collector.close()
    for h in handles:
        h.remove()
    for name in linears:
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]])
        assert torch.allclose(collector.hessian(name), 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-6), name
    assert collector.hessian("self_attn.q_proj") is collector.hessian("self_attn.v_proj")
    assert collector.hessian("mlp.gate_proj") is collector.hessian("mlp.up_proj")
    assert collector.hessian("mlp.gate_proj") is not collector.hessian("self_attn.o_proj")
