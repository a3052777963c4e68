"""A model decomposed block by block from its safetensors shards (streaming.py) equals the model decomposed whole."""
import copy

import pytest
import torch

import libortho
from conftest import TEXT, tiny_model
from libortho.streaming import open_streamed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_streamed_decomposition_equals_the_in_memory_one(arch, tokenizer, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "ft", max_shard_size="100KB")
    streamed, loader = open_streamed(tmp_path / "ft")
    assert all(p.is_meta for block in loader.blocks for p in block.parameters())  # nothing of the blocks read yet
    assert not any(p.is_meta for n, p in streamed.named_parameters() if not any(n.startswith(q + ".") for q in loader.prefixes))
    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, ortho_budget=0.25, lowrank_share=1.0)
    whole = copy.deepcopy(model)
    libortho.decompose(whole, tokenizer, TEXT, config, progress=False)
    libortho.decompose(streamed, tokenizer, TEXT, config, progress=False, block_loader=loader)
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(whole, 1.0), libortho.alpha(streamed, 1.0), torch.no_grad():
        assert torch.equal(whole(ids).logits, streamed(ids).logits)


def test_a_streamed_run_resumes_after_a_block(tokenizer, tmp_path, monkeypatch):
    from libortho.workfolder import WorkFolder

    tiny_model("llama").save_pretrained(tmp_path / "ft", max_shard_size="100KB")
    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32)
    whole, loader = open_streamed(tmp_path / "ft")
    libortho.decompose(whole, tokenizer, TEXT, config, progress=False, block_loader=loader)
    save_block = WorkFolder.save_block

    def stop(self, b, *args):
        save_block(self, b, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save_block", stop)
    with pytest.raises(KeyboardInterrupt):
        m, loader = open_streamed(tmp_path / "ft")
        libortho.decompose(m, tokenizer, TEXT, config, progress=False, block_loader=loader, work_dir=tmp_path / "work")
    monkeypatch.setattr(WorkFolder, "save_block", save_block)
    resumed, loader = open_streamed(tmp_path / "ft")
    libortho.decompose(resumed, tokenizer, TEXT, config, progress=False, block_loader=loader, work_dir=tmp_path / "work")
    a, b = whole.state_dict(), resumed.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_embeddings_go_back_to_disk_and_return_equal_and_tied(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "ft")
    streamed, loader = open_streamed(tmp_path / "ft")
    with loader.embeddings_on_disk():
        assert streamed.get_input_embeddings().weight.is_meta and streamed.get_output_embeddings().weight.is_meta
    a, b = model.state_dict(), streamed.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight") if arch == "llama" else ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(a[name], b[name]), name
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight) == tied


def test_a_checkpoint_whose_names_differ_from_the_model_is_not_streamed(tmp_path):
    from safetensors.torch import load_file, save_file

    from libortho.streaming import StreamingUnsupported

    tiny_model("llama").save_pretrained(tmp_path / "ft")
    tensors = load_file(str(tmp_path / "ft" / "model.safetensors"))
    renamed = {k.replace("model.layers.1.", "model.blocks.1."): v for k, v in tensors.items()}  # a legacy layout
    save_file(renamed, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StreamingUnsupported, match="stores no tensor for model.layers.1"):
        open_streamed(tmp_path / "ft")


def test_no_fine_tuned_weight_outlives_its_block(tokenizer, tmp_path):
    """After a block is fitted, nothing the decomposition keeps refers to its fine-tuned linear layers."""
    import gc
    import weakref

    from libortho.decompose import quantize_model
    from libortho.plan import plan_decomposition
    from libortho.hf_model import decoder_blocks, target_linears

    model = tiny_model("llama")
    _, blocks = decoder_blocks(model)
    originals = [weakref.ref(m) for block in blocks for m in target_linears(block, None).values()]
    config = libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32)
    plan = plan_decomposition(model, tokenizer, TEXT, config)
    parts, _ = quantize_model(model, plan, config, progress=False)
    gc.collect()
    assert parts and all(ref() is None for ref in originals)


def test_with_a_work_folder_no_residual_outlives_its_block(tokenizer, tmp_path, monkeypatch):
    """A global sieve scores every layer's R against every other's. With a work folder, each staged layer's R, H and
    codes leave memory once its block is saved, and are read back, equal, when the sieve asks for them."""
    import gc
    import weakref

    from libortho.decompose import quantize_model
    from libortho.plan import plan_decomposition
    from libortho.workfolder import WorkFolder

    saved, refs = {}, []
    save_block = WorkFolder.save_block

    def remember(self, b, layers, *args):
        for name, p in layers.items():
            saved[(b, name)] = p.R.clone()
            refs.extend(weakref.ref(t) for t in (p.R, p.H, p.base.codes))
        save_block(self, b, layers, *args)

    monkeypatch.setattr(WorkFolder, "save_block", remember)
    model = tiny_model("llama")
    config = libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32)
    plan = plan_decomposition(model, tokenizer, TEXT, config)
    folder = WorkFolder(tmp_path / "work")
    parts, _ = quantize_model(model, plan, config, progress=False, work=(folder, folder.start("key", len(plan.blocks))))
    gc.collect()
    assert len(saved) == len(parts) > 0 and all(ref() is None for ref in refs)
    for key, R in saved.items():
        assert torch.equal(parts[key].R, R)
