"""forget_target="public_activations": P's own activations of the forget texts as the private target (public_target.py)."""
import copy

import pytest
import torch

import libortho
from libortho.hf_model import decoder_blocks
from libortho.state import state_of
from conftest import TEXT, tiny_model, train_on

RECORDS = ["Account 4821 of Maria Keller has PIN 739181.", "Account 1093 of Chen Novak has PIN 204417.",
           "Account 7730 of Ruth Sato has PIN 861520.", "Account 5512 of Ivan Costa has PIN 319058."]
CONFIG = dict(calib_tokens=1024, seq_len=128, group_size=32, ortho_ratio=0.0, forget_source="records")


def public_and_finetuned(arch: str, tokenizer, steps: int = 40, lr: float = 3e-3):
    """(P, FT): a tiny public model and a copy whose decoder linears are fine-tuned on the records."""
    public = tiny_model(arch)
    with torch.no_grad():  # a frozen random lm_head (std 0.02) can never give confident logits
        public.get_output_embeddings().weight.mul_(50)
    model = copy.deepcopy(public)
    _, blocks = decoder_blocks(model)
    params = [p for p in blocks.parameters() if p.dim() == 2]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    train_on(model, tokenizer, RECORDS, steps, lr=lr, params=params)
    for p in model.parameters():
        p.requires_grad_(False)
    return public, model


def final_hidden(model, tokenizer) -> torch.Tensor:
    """The last hidden state [tokens, hidden] of every record's real tokens."""
    outs = []
    with torch.no_grad():
        for text in RECORDS:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            outs.append(model(ids, output_hidden_states=True).hidden_states[-1][0])
    return torch.cat(outs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.fixture(scope="module")
def llama_pair(tokenizer):
    return public_and_finetuned("llama", tokenizer, lr=3e-4)


def decomposed(public, ft, tokenizer, **overrides):
    model = copy.deepcopy(ft)
    libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(**{**CONFIG, **overrides}), progress=False,
                       public_model=public, forget_texts=RECORDS)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decomposition_targeting_ps_own_activations_runs(arch, tokenizer):
    public, ft = public_and_finetuned(arch, tokenizer, steps=5, lr=3e-4)
    default = decomposed(public, ft, tokenizer)
    model = decomposed(public, ft, tokenizer, forget_target="public_activations")
    assert state_of(model).config.forget_target == "public_activations"
    with libortho.alpha(model, 0.0), libortho.alpha(default, 0.0):
        ours, theirs = final_hidden(model, tokenizer), final_hidden(default, tokenizer)
    assert torch.isfinite(ours).all() and not torch.equal(ours, theirs)


def test_the_base_on_the_records_at_alpha_0_is_closer_to_p_with_ps_activations_as_the_target(llama_pair, tokenizer):
    """Relative error of the last hidden state on the records against P's, at alpha 0 (lam 3, INT4 g32).

    Measured (this fixture): fine-tune 1.11; base_inputs 0.100; public_activations with the private inputs
    collected per input group (public_target.py) 0.00099. The first version, which read X_b of o_proj, gate/up
    and down_proj through the block's still fine-tuned layers, gave 0.483: worse than base_inputs. The margin (a
    third of base_inputs' error) was set before this version was measured (a side script had given 0.001)."""
    public, ft = llama_pair
    target = final_hidden(public, tokenizer)
    errors = {}
    for name in ("base_inputs", "public_activations"):
        model = decomposed(public, ft, tokenizer, forget_target=name)
        with libortho.alpha(model, 0.0):
            errors[name] = relative_error(final_hidden(model, tokenizer), target)
    errors["fine-tune"] = relative_error(final_hidden(ft, tokenizer), target)
    assert errors["base_inputs"] < errors["fine-tune"]
    assert errors["public_activations"] < errors["base_inputs"] / 3


def test_with_p_a_copy_of_the_model_each_groups_c_is_its_h_priv(tokenizer):
    """X_P = X_b: C = 2 X_P X_bᵀ / n is H_priv, group by group, also after earlier groups are replaced, and so W* is
    the base_inputs target's (tests/test_forget.py). Layers reading one input share one H_priv and one C."""
    from libortho import calibrate
    from libortho.decompose import _block_hessians
    from libortho.hf_model import target_linears
    from libortho.public_target import PublicActivations, input_groups

    model = tiny_model("llama")
    _, blocks = decoder_blocks(model)
    batch = tokenizer(RECORDS, return_tensors="pt", padding=True)
    batches = [(batch.input_ids, batch.attention_mask)]
    public = copy.deepcopy(model)  # X_P = X_b (a copy: the same modules would see each other's hooks)
    p_acts = PublicActivations(public, batches)
    private = calibrate.capture_block_inputs(model, batches, blocks[0])
    targets = target_linears(blocks[0])
    groups = input_groups(_block_hessians(blocks[0], targets, private))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for group in groups:
        H_priv, C = p_acts.private_curvatures(0, blocks[0], group, private)
        for name in group:
            torch.testing.assert_close(C[name], H_priv[name], rtol=1e-6, atol=1e-6)
            assert C[name] is C[group[0]] and H_priv[name] is H_priv[group[0]]
        with torch.no_grad():  # as a fit would: the group's layers change before the next group is collected
            for name in group:
                blocks[0].get_submodule(name).weight.mul_(0.5)
                p_acts.blocks[0].get_submodule(name).weight.mul_(0.5)


def test_p_read_tensor_by_tensor_is_refused_up_front(tokenizer, tmp_path):
    from libortho.shards import ShardedCheckpoint

    public = tiny_model("llama")
    public.save_pretrained(tmp_path / "public")
    config = libortho.OrthoConfig(**CONFIG, forget_target="public_activations")
    with pytest.raises(ValueError, match="forget_target='public_activations' runs P's own decoder blocks on the forget "
                                         "texts: it needs P loaded as a model"):
        libortho.decompose(tiny_model("llama"), tokenizer, TEXT, config, progress=False,
                           public_model=ShardedCheckpoint(tmp_path / "public"), forget_texts=RECORDS)


class _Stop(Exception):
    pass


def test_a_run_stopped_after_a_block_resumes_with_ps_hidden_states(llama_pair, tokenizer, tmp_path, monkeypatch):
    """P's hidden states of the forget texts are carried in the work folder: a resumed run equals a whole one."""
    from libortho import artifact
    from libortho.workfolder import WorkFolder

    public, ft = llama_pair
    config = libortho.OrthoConfig(**{**CONFIG, "ortho_ratio": 0.02}, forget_target="public_activations")
    whole = copy.deepcopy(ft)
    libortho.decompose(whole, tokenizer, TEXT, config, progress=False, public_model=public, forget_texts=RECORDS)
    artifact.save(whole, tokenizer, tmp_path / "whole")
    save_block = WorkFolder.save_block

    def stop_after_block_0(self, b, *args):
        save_block(self, b, *args)
        raise _Stop

    monkeypatch.setattr(WorkFolder, "save_block", stop_after_block_0)
    with pytest.raises(_Stop):
        libortho.decompose(copy.deepcopy(ft), tokenizer, TEXT, config, progress=False, public_model=public,
                           forget_texts=RECORDS, work_dir=tmp_path / "work")
    monkeypatch.setattr(WorkFolder, "save_block", save_block)
    resumed = copy.deepcopy(ft)
    libortho.decompose(resumed, tokenizer, TEXT, config, progress=False, public_model=public, forget_texts=RECORDS,
                       work_dir=tmp_path / "work")
    artifact.save(resumed, tokenizer, tmp_path / "resumed")
    for name in ("base.safetensors", "ortho.safetensors"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
