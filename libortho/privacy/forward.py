"""How the attacks of :mod:`libortho.privacy` run a Hugging Face causal LM (transformers 4.x and 5.x).

One forward pass with or without a KV cache (:func:`lm_forward`), conversions between the
cache objects and per-layer (K, V) tensors, tokenization as the fine-tuning does it, the split
of prefix + candidate into a shared context and per-candidate continuations, and a context run
once (:class:`Context`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..hf_model import module_device

__all__ = ["KV", "lm_forward", "cache_to_kv", "kv_to_cache", "kv_concat", "encode", "common_prefix_len",
           "split_continuations", "Context", "run_context"]

# Defaults of the attacks, written once: texts per forward (membership, extraction, white box) and
# candidate continuations per forward (exposure).
TEXT_BATCH_SIZE = 16
CANDIDATE_BATCH_SIZE = 64

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, seq, head_dim]


@functools.lru_cache(maxsize=None)
def _cache_arg_for(model_type: type) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_arg(model: torch.nn.Module) -> str:
    return _cache_arg_for(type(model))


def lm_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, Any]:
    """One forward pass; returns (logits [B, T, V], the updated KV cache or None)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": use_cache}
    if cache is not None:
        kwargs[_cache_arg(model)] = cache
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(**kwargs)
    # transformers 5.x outputs `.cache`; reading `.past_key_values` there only warns.
    new_cache = out.cache if hasattr(out, "cache") else getattr(out, "past_key_values", None)
    return out.logits, new_cache


def cache_to_kv(cache: Any) -> KV:
    """Extract per-layer (K, V) tensors from a DynamicCache (5.x or 4.x) or a legacy tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


def kv_to_cache(kv: KV) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(kv):
        cache.update(k, v, layer_idx)
    return cache


def kv_concat(prefix: KV, suffix: KV | None, batch: int) -> KV:
    """Prefix KV (batch 1) broadcast to ``batch`` rows, followed by per-row suffix KV."""
    out = []
    for i, (pk, pv) in enumerate(prefix):
        k = pk.expand(batch, -1, -1, -1)
        v = pv.expand(batch, -1, -1, -1)
        if suffix is not None and suffix[i][0].shape[2] > 0:
            k = torch.cat([k, suffix[i][0]], dim=2)
            v = torch.cat([v, suffix[i][1]], dim=2)
        out.append((k.contiguous(), v.contiguous()))
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    # Same call the fine-tuning uses (special tokens as the tokenizer adds them, e.g. BOS).
    return list(tokenizer(text)["input_ids"])


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_continuations(
    tokenizer: Any, prefix: str, candidates: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """Tokenize prefix+candidate jointly; return (shared context ids, continuation ids per candidate).

    The shared context is the longest token prefix common to ``tokenize(prefix)`` and every
    ``tokenize(prefix + candidate)``. Normally that is all of ``tokenize(prefix)``; when the
    tokenizer merges across the boundary (e.g. "key " + "a1" -> "key", " a", "1") it is shorter
    and the continuation includes the merged token. Either way a candidate's score is
    log p(tokenize(prefix + candidate)) - log p(shared), so scores stay comparable.
    """
    prefix_ids = encode(tokenizer, prefix)
    joint = [encode(tokenizer, prefix + c) for c in candidates]
    shared_len = len(prefix_ids)
    for ids in joint:
        shared_len = min(shared_len, common_prefix_len(prefix_ids, ids))
    if shared_len == 0:
        raise ValueError(
            f"prefix {prefix!r} shares no token with its continuations; add a BOS token or a longer prefix"
        )
    return prefix_ids[:shared_len], [ids[shared_len:] for ids in joint]


@dataclass
class Context:
    """A shared context run once: its KV cache (batch 1) and next-token log-probs [V]."""

    kv: KV
    next_logprobs: torch.Tensor


@torch.inference_mode()
def run_context(model: torch.nn.Module, ids: Sequence[int]) -> Context:
    input_ids = torch.tensor([list(ids)], device=module_device(model))
    logits, cache = lm_forward(model, input_ids)
    return Context(cache_to_kv(cache), torch.log_softmax(logits[0, -1].float(), dim=-1))
