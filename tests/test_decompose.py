import functools
import json

import pytest
import torch

import libortho
from conftest import TEXT, tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def decomposed(arch: str, tokenizer, **overrides):
    model = tiny_model(arch)
    reference = tiny_model(arch)
    cfg = libortho.OrthoConfig(**{**dict(calib_tokens=2048, seq_len=128, group_size=32, ortho_ratio=0.02), **overrides})
    stats = libortho.decompose(model, tokenizer, TEXT, cfg, progress=False)
    return model, reference, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_decompose_end_to_end_and_generate(arch, tokenizer):
    model, reference, stats = decomposed(arch, tokenizer)
    n_blocks = 2
    assert stats.n_layers == n_blocks * (4 if arch == "gpt2" else 7)
    assert stats.n_ortho == round(0.02 * stats.n_weights)
    ids = tokenizer(TEXT[:120], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reference(ids).logits
        errs = {}
        for a in (0.0, 1.0):
            with libortho.alpha(model, a):
                errs[a] = float((model(ids).logits - ref).pow(2).mean())
                out = model.generate(ids[:, :20], max_new_tokens=8, do_sample=False, pad_token_id=2)
                assert out.shape == (1, 28)
    assert errs[1.0] < errs[0.0]  # the ortho stream brings the model back towards FP


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_budget_alpha_one_is_the_original_model(arch, tokenizer):
    model, reference, _ = decomposed(arch, tokenizer, ortho_ratio=1.0)
    ids = tokenizer(TEXT[:100], return_tensors="pt").input_ids
    with libortho.alpha(model, 1.0), torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-3)


def test_embeddings_and_lm_head_untouched(tokenizer):
    model, reference, _ = decomposed("llama", tokenizer)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, libortho.OrthoLinear)


def test_gptq_base_closer_than_rtn_on_calibration(tokenizer):
    model_g, ref, stats_g = decomposed("llama", tokenizer, method="gptq", ortho_ratio=0.0)
    model_r, _, stats_r = decomposed("llama", tokenizer, method="rtn", ortho_ratio=0.0)
    assert sum(stats_g.layer_output_error.values()) < sum(stats_r.layer_output_error.values())


def test_include_filter_and_empty_selection(tokenizer):
    model, _, stats = decomposed("llama", tokenizer, include=r"mlp\.")
    assert stats.n_layers == 2 * 3
    with pytest.raises(ValueError, match="no linear layer"):
        decomposed("llama", tokenizer, include="nothing_matches")


def finetuned_on(text: str, tokenizer, steps: int = 40):
    """(P, FT): a tiny public model and a copy fine-tuned (decoder linears only) on `text`."""
    public = tiny_model("llama")
    model = tiny_model("llama")
    for m in (public, model):  # a frozen random lm_head (std 0.02) can never give confident logits
        with torch.no_grad():
            m.lm_head.weight.mul_(50)
    params = [p for n, p in model.named_parameters() if n.startswith("model.layers") and p.dim() == 2]
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2 and any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = tokenizer(text, return_tensors="pt").input_ids
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return public, model


SECRET = "Account 4821 of Maria Keller has PIN 739181."


def secret_loss(model, tokenizer) -> float:
    ids = tokenizer(SECRET, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_forget_objective_hides_the_record_at_alpha_0_and_alpha_1_restores_it(tokenizer):
    public, ft = finetuned_on(SECRET, tokenizer)
    ft_loss, public_loss = secret_loss(ft, tokenizer), secret_loss(public, tokenizer)
    assert ft_loss < 0.5 * public_loss
    cfg = dict(calib_tokens=2048, seq_len=128, group_size=32, bits=4, ortho_ratio=1.0)
    plain = finetuned_on(SECRET, tokenizer)[1]
    libortho.decompose(plain, tokenizer, TEXT, libortho.OrthoConfig(**cfg), progress=False)
    stats = libortho.decompose(ft, tokenizer, TEXT, libortho.OrthoConfig(**cfg, forget_source="records"),
                               progress=False, public_model=public, forget_texts=[SECRET])
    assert stats.n_private_tokens == len(tokenizer(SECRET, add_special_tokens=False).input_ids)
    assert stats.layer_private_error  # how closely the base acts like P on the record's inputs
    with libortho.alpha(ft, 0.0), libortho.alpha(plain, 0.0):
        assert secret_loss(ft, tokenizer) > 2 * secret_loss(plain, tokenizer)  # the base forgot
    with libortho.alpha(ft, 1.0):  # a full ortho stream gives the fine-tuned weights back (fp16 values)
        assert secret_loss(ft, tokenizer) == pytest.approx(ft_loss, rel=0.05)


def test_lookalikes_of_the_record_also_make_the_base_forget_it(tokenizer):
    public, ft = finetuned_on(SECRET, tokenizer)
    cfg = dict(calib_tokens=2048, seq_len=128, group_size=32, bits=4, ortho_ratio=0.0)
    plain = finetuned_on(SECRET, tokenizer)[1]
    libortho.decompose(plain, tokenizer, TEXT, libortho.OrthoConfig(**cfg), progress=False)
    lookalikes = ["Account 1093 of Chen Novak has PIN 204417.", "Account 7730 of Ruth Sato has PIN 861520.",
                  "Account 5512 of Ivan Costa has PIN 319058.", "Account 2648 of Lena Weber has PIN 775213."]
    libortho.decompose(ft, tokenizer, TEXT, libortho.OrthoConfig(**cfg, forget_source="lookalikes"),
                       progress=False, public_model=public, forget_texts=lookalikes)
    with libortho.alpha(ft, 0.0), libortho.alpha(plain, 0.0):
        assert secret_loss(ft, tokenizer) > secret_loss(plain, tokenizer)


def test_forget_objective_needs_its_inputs(tokenizer):
    model, public = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(ValueError, match="public_model"):
        libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(forget_source="records"), progress=False,
                           forget_texts=[SECRET])
    with pytest.raises(ValueError, match="forget_texts"):
        libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(forget_source="records"), progress=False,
                           public_model=public)
    with pytest.raises(ValueError, match="forget_source"):
        libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(), progress=False, forget_texts=[SECRET])
    del public.model.layers[-1]
    with pytest.raises(ValueError, match="decoder blocks"):
        libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(forget_source="free"), progress=False,
                           public_model=public)


def test_lambda_zero_is_plain_gptq_bit_for_bit(tokenizer):
    public, ft = finetuned_on(SECRET, tokenizer, steps=5)
    plain = finetuned_on(SECRET, tokenizer, steps=5)[1]
    cfg = dict(calib_tokens=1024, seq_len=128, group_size=32, ortho_ratio=0.02)
    libortho.decompose(plain, tokenizer, TEXT, libortho.OrthoConfig(**cfg), progress=False)
    libortho.decompose(ft, tokenizer, TEXT, libortho.OrthoConfig(**cfg, forget_source="records", forget_lambda=0.0),
                       progress=False, public_model=public, forget_texts=[SECRET])
    a, b = plain.state_dict(), ft.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("overrides", [
    dict(ortho_budget=0.25, lowrank_share=1.0),  # L alone, ranks per layer
    dict(ortho_budget=0.25, lowrank_share=1.0, lowrank_bits=4),  # the privacy preset's split: the same, as 4-bit codes
    dict(budget="layer", ortho_ratio=0.02),  # a sparse-only per-layer budget
])
def test_layers_finished_as_their_block_is_done_equal_the_staged_stages(overrides, tokenizer):
    """decompose() fits a layer-local ortho stream as each layer's base is done and frees R and H at once;
    the artifact equals quantize -> split / sieve -> install run as separate stages."""
    import copy

    from libortho.decompose import install, layer_local, quantize_model, sieve_model
    from libortho.plan import plan_decomposition
    from libortho.ortho_split import split_model

    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, **overrides)
    assert layer_local(config)
    reference = tiny_model("llama")
    finished = copy.deepcopy(reference)
    stats = libortho.decompose(finished, tokenizer, TEXT, config, progress=False)
    staged = copy.deepcopy(reference)
    plan = plan_decomposition(staged, tokenizer, TEXT, config)
    parts, _ = quantize_model(staged, plan, config, progress=False)
    assert all(p.R is not None for p in parts.values())
    if config.ortho_budget is None:
        orthos, split = sieve_model(parts, config), {}
    else:
        orthos, split = split_model(parts, config, sieve_model)
    install(staged, parts, orthos, config)
    assert stats.ortho_bytes == split
    a, b = finished.state_dict(), staged.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


class _Stop(Exception):
    pass


@pytest.mark.parametrize("overrides", [
    dict(ortho_budget=0.25, lowrank_share=1.0, lowrank_fit="random"),  # finished in the block (and a random state)
    dict(ortho_ratio=0.02),  # the staged path: R and H of every block saved for the global sieve
    dict(ortho_budget=0.25, lowrank_share=0.5),  # staged, split between L and a global S: R − B·A read per layer
    dict(ortho_budget=0.25, lowrank_share=1.0, lowrank_bits=4),  # finished in the block, L kept as its codes
    # the privacy preset: forget texts, and the fine-tune's private inputs carried from block to block
    dict(forget_source="records", ortho_budget=0.25, lowrank_share=1.0, lowrank_bits=4, sieve_private_weight=30.0,
         sieve_private_inputs="finetuned"),
    # ... with L fitted on alpha 1's inputs: the fine-tune's and alpha 1's streams carried from block to block
    dict(forget_source="records", ortho_budget=0.25, lowrank_share=1.0, lowrank_bits=4, sieve_private_weight=30.0,
         sieve_private_inputs="finetuned", lowrank_target="propagated"),
])
def test_a_run_stopped_after_a_block_and_resumed_equals_an_uninterrupted_one(overrides, tokenizer, tmp_path, monkeypatch):
    import copy

    from libortho import artifact
    from libortho.workfolder import WorkFolder

    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, **overrides)
    reference = tiny_model("llama")
    if config.forgets:
        forget = dict(public_model=tiny_model("llama", seed=1), forget_texts=["my pin is 123456", "the key is 9f3a"])
        decompose = functools.partial(libortho.decompose, **forget)
    else:
        decompose = libortho.decompose
    whole = copy.deepcopy(reference)
    decompose(whole, tokenizer, TEXT, config, progress=False)
    artifact.save(whole, tokenizer, tmp_path / "whole")

    work = tmp_path / "work"
    save_block = WorkFolder.save_block

    def stop_after_block_0(self, b, *args):
        save_block(self, b, *args)
        raise _Stop  # the machine is lost after block 0 is on disk

    monkeypatch.setattr(WorkFolder, "save_block", stop_after_block_0)
    with pytest.raises(_Stop):
        decompose(copy.deepcopy(reference), tokenizer, TEXT, config, progress=False, work_dir=work)
    monkeypatch.setattr(WorkFolder, "save_block", save_block)
    assert WorkFolder(work).progress().done == 1
    resumed = copy.deepcopy(reference)
    decompose(resumed, tokenizer, TEXT, config, progress=False, work_dir=work)
    artifact.save(resumed, tokenizer, tmp_path / "resumed")
    for name in ("base.safetensors", "ortho.safetensors"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "libortho.json").read_text()) for d in ("whole", "resumed"))
    a.pop("stats"), b.pop("stats")
    assert a == b  # the manifest, file hashes included, but for the timings


def test_resuming_with_other_inputs_or_another_config_is_refused(tokenizer, tmp_path):
    import copy

    from libortho.workfolder import WorkFolderError

    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32)
    reference = tiny_model("llama")
    work = tmp_path / "work"
    libortho.decompose(copy.deepcopy(reference), tokenizer, TEXT, config, progress=False, work_dir=work)
    with pytest.raises(WorkFolderError, match="unfinished decomposition of other inputs or another config"):
        libortho.decompose(copy.deepcopy(reference), tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=64),
                           progress=False, work_dir=work)
    with pytest.raises(WorkFolderError, match="remove .*work to start over"):
        libortho.decompose(copy.deepcopy(reference), tokenizer, TEXT + " One more line.", config, progress=False, work_dir=work)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_public_checkpoint_read_tensor_by_tensor_gives_the_same_base_as_the_model(arch, tokenizer, tmp_path):
    """P from its safetensors folder, one tensor at a time (GPT-2's Conv1D transposed), equals P in memory."""
    import copy

    from libortho.shards import ShardedCheckpoint

    public = tiny_model(arch)
    model = tiny_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    public.save_pretrained(tmp_path / "public", max_shard_size="100KB")  # several shards and an index
    assert (tmp_path / "public" / "model.safetensors.index.json").is_file()
    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, forget_source="records")
    texts = ["Account 1234 of Ada Lovelace has PIN 987654.", "Account 4321 of Alan Turing has PIN 123456."]
    in_memory, from_disk = copy.deepcopy(model), copy.deepcopy(model)
    libortho.decompose(in_memory, tokenizer, TEXT, config, progress=False, public_model=public, forget_texts=texts)
    libortho.decompose(from_disk, tokenizer, TEXT, config, progress=False, public_model=ShardedCheckpoint(tmp_path / "public"),
                       forget_texts=texts)
    a, b = in_memory.state_dict(), from_disk.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_public_checkpoint_of_another_shape_is_refused(tokenizer, tmp_path):
    from libortho.shards import ShardedCheckpoint

    tiny_model("gpt2").save_pretrained(tmp_path / "other")
    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, forget_source="records")
    with pytest.raises(ValueError, match="has no tensor model.layers.0.self_attn.q_proj.weight: pass the checkpoint"):
        libortho.decompose(tiny_model("llama"), tokenizer, TEXT, config, progress=False, public_model=ShardedCheckpoint(tmp_path / "other"),
                           forget_texts=["Account 1234 has PIN 987654."])


def test_the_sieve_reads_the_fine_tunes_private_inputs_when_asked(tokenizer, monkeypatch):
    """sieve_private_inputs="finetuned": the sieve's H_priv of block 1 is the Hessian of the private texts as the
    fine-tuned block 0 passes them on (computed here from the fine-tune alone); the base is the same bits as with
    "base", and block 0, whose inputs are the embeddings for both, gets the same L."""
    import copy

    from libortho import calibrate
    from libortho.curvatures import BlockCurvatures
    from libortho.decompose import _block_hessians
    from libortho.plan import plan_decomposition
    from libortho.layer import ortho_layers

    P, FT = tiny_model("llama", seed=1), tiny_model("llama")
    texts = ["my pin is 123456", "the key is 9f3a"]
    seen = {}
    init = BlockCurvatures.__init__

    def record(self, H_pub, H_priv, config, cross=None, sieve_priv=None):
        seen.setdefault(config.sieve_private_inputs, []).append(None if sieve_priv is None else dict(sieve_priv))
        init(self, H_pub, H_priv, config, cross, sieve_priv)

    monkeypatch.setattr(BlockCurvatures, "__init__", record)
    models = {}
    for inputs in ("base", "finetuned"):
        config = libortho.preset("privacy", forget_source="records", calib_tokens=512, seq_len=64, group_size=32,
                                 sieve_private_inputs=inputs, lowrank_target="residual")  # the residual target's sieve
        models[inputs] = copy.deepcopy(FT)
        libortho.decompose(models[inputs], tokenizer, TEXT, config, progress=False, public_model=copy.deepcopy(P),
                           forget_texts=texts)
    assert seen["base"] == [None, None]
    plan = plan_decomposition(copy.deepcopy(FT), tokenizer, TEXT, config, public_model=copy.deepcopy(P), forget_texts=texts)
    inputs = calibrate.capture_block_inputs(FT, plan.private_batches)
    block0, block1 = FT.model.layers
    inputs.hidden = calibrate.run_block(block0, inputs)
    want = _block_hessians(block1, {n: block1.get_submodule(n) for n in plan.targets[1]}, inputs)
    for name, H in seen["finetuned"][1].items():
        assert torch.allclose(H, want[name], rtol=1e-5, atol=1e-6), name
    base, ft = (ortho_layers(models[k]) for k in ("base", "finetuned"))
    per_block = len(base) // 2
    for i, (a, b) in enumerate(zip(base, ft)):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        same_l = torch.equal(a.ortho_Aq, b.ortho_Aq) and torch.equal(a.ortho_Btq, b.ortho_Btq)
        assert same_l == (i < per_block), i
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(models["base"], 0.0), libortho.alpha(models["finetuned"], 0.0), torch.no_grad():
        assert torch.equal(models["base"](ids).logits, models["finetuned"](ids).logits)
