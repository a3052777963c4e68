"""Reading a checkpoint folder's safetensors one tensor at a time (shards.py)."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from libortho.artifact_format import ArtifactError
from libortho.shards import ShardedCheckpoint


def test_tensors_come_back_as_stored_with_their_shapes(tmp_path):
    a, b = torch.randn(3, 4), torch.arange(6, dtype=torch.int32).reshape(2, 3)
    save_file({"a": a}, str(tmp_path / "s1.safetensors"))
    save_file({"b": b}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}')
    ckpt = ShardedCheckpoint(tmp_path)
    assert "a" in ckpt and "c" not in ckpt
    assert ckpt.shape("b") == (2, 3)
    assert torch.equal(ckpt.get("a"), a) and torch.equal(ckpt.get("b"), b) and ckpt.get("b").dtype == torch.int32
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    ckpt.hash_into(h1)
    save_file({"a": a + 1}, str(tmp_path / "s1.safetensors"))
    ShardedCheckpoint(tmp_path).hash_into(h2)
    assert h1.hexdigest() != h2.hexdigest()


def test_a_folder_without_safetensors_or_with_a_broken_index_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="has no model.safetensors or model.safetensors.index.json"):
        ShardedCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is not a safetensors index"):
        ShardedCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ArtifactError, match="cannot read .* as safetensors"):
        ShardedCheckpoint(tmp_path)
