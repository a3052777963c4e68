import torch


def test_hessians_are_exact_per_layer_over_many_batches(tokenizer):
    """Shared accumulation (q/k/v, gate/up) must never mistake a new activation for the last one,
    even when the allocator hands it the freed memory of an earlier one of the same shape."""
    from conftest import TEXT, tiny_model
    from libortho.calibrate import HessianCollector, calibration_windows, capture_block_inputs, run_block, window_batches
    from libortho.hf_model import decoder_blocks, target_linears

    model = tiny_model("llama")
    windows = calibration_windows(tokenizer, TEXT, 8 * 32, 32)
    block = decoder_blocks(model)[1][0]
    linears = target_linears(block)
    inputs = capture_block_inputs(model, window_batches(windows, 2))
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


def test_padding_stays_out_of_the_hessian(tokenizer):
    """Padded forget texts: H over the real tokens only, equal to H of each text run on its own."""
    from conftest import tiny_model
    from libortho.calibrate import HessianCollector, capture_block_inputs, run_block, text_batches
    from libortho.hf_model import decoder_blocks, target_linears

    model = tiny_model("llama")
    block = decoder_blocks(model)[1][0]
    linears = {"self_attn.q_proj": target_linears(block)["self_attn.q_proj"]}
    texts = ["a short one", "a rather longer text than the first one"]

    def hessian(batches):
        collector = HessianCollector(linears)
        run_block(block, capture_block_inputs(model, batches), collector)
        collector.close()
        return collector.hessian("self_attn.q_proj"), collector.counts["self_attn.q_proj"]

    H_padded, n_padded = hessian(text_batches(tokenizer, texts, batch_size=2))
    singles = [hessian(text_batches(tokenizer, [t])) for t in texts]
    n = sum(c for _, c in singles)
    assert n_padded == n == sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    H_each = sum(H * c for H, c in singles) / n
    assert torch.allclose(H_padded, H_each, rtol=1e-4, atol=1e-6)
