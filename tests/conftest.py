"""Shared fixtures: tiny offline tokenizer and tiny causal LMs of several architectures."""
from __future__ import annotations

import os
import string

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when its kernels are decorated, i.e. the first time any test (or the
    # CLI's `bench` import) imports libortho.kernels: set it before every test module.
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (pyproject's addopts run two workers) the cores are shared: split them, so
# that the workers' intra-op threads do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language. "
    "Lists, tuples and dictionaries are built-in types; functions are first-class objects. "
) * 40


def char_tokenizer():
    """A character-level fast tokenizer built locally (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_model(arch: str, vocab_size: int = 104, seed: int = 0):
    """A randomly initialised 2-block causal LM of the given architecture family."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        return tf.GPT2LMHeadModel(cfg).eval()
    llama_like = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **common,
    )
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    return cls[1](cls[0](**llama_like)).eval()


def train_on(model: torch.nn.Module, tokenizer, texts: list[str], steps: int, lr: float = 1e-2,
             params: list[torch.nn.Parameter] | None = None) -> float:
    """Full-batch Adam on ``texts`` until memorised, over ``params`` (None: every parameter); returns the final
    mean token loss."""
    enc = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), 1)
    labels = torch.full((len(enc), width), -100)
    for i, seq in enumerate(enc):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(seq)
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from more, and on shared cores they thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
