"""The decoder forward of Llama-architecture models against a SlotCache, for prefill and decode.

A compact re-statement of transformers' Llama forward (also Qwen2 and Mistral without a sliding
window: the same blocks, with optional q/k/v biases) that reads the model's own modules: the
embedding, each block's norms, projections (libortho OrthoLinear layers: per-row alpha) and MLP,
the rotary frequencies, the final norm and lm_head. What it changes is the cache: every row
reads and writes its own slot at its own positions, with no padding of one row's tokens into
another's, so rows of different lengths and alphas run in one step and the step's shapes depend
only on the number of rows and the attention width (what a CUDA graph needs).

Shapes: n rows, T tokens per row (1 for decode), W attention width (columns 0..W-1 of each
row's slot), H hidden size, nh / kv query / key-value heads of size d, V vocabulary.

Alpha is not an argument: the OrthoLinear layers read it from the model's switch, so a caller
runs `forward` inside `libortho.alpha(model, per_row)` with one alpha per row.

With `fused=True` (CUDA, fp16/bf16 weights; `ServeConfig.fused_small_ops`) the small elementwise
work of a block (residual adds with the RMSNorms, RoPE with the scale of q and the cache writes)
runs as the fused Triton kernels of libortho.kernels.small_ops, bitwise equal to the PyTorch
expressions they replace under Triton's interpreter; otherwise the block runs transformers' modules.
"""
from __future__ import annotations

import torch
from torch import nn

from .slot_cache import SlotCache

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
# RoPE types whose frequencies depend on the sequence length (recomputed by transformers on the fly)
DYNAMIC_ROPE = ("dynamic", "longrope")
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def unsupported_reason(model: nn.Module, max_len: int) -> str | None:
    """Why `LlamaStep` cannot run this model with a cache of `max_len` tokens (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, name) for name in needed) or not hasattr(model, "lm_head"):
        return "the model does not have transformers' Llama layout (model.embed_tokens, layers, norm, rotary_emb)"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope in DYNAMIC_ROPE:
        return f"RoPE type {rope!r} changes its frequencies with the sequence length"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_len:
        return f"sliding-window attention ({window} tokens) over a context of {max_len}"
    for i, block in enumerate(inner.layers):
        attn = getattr(block, "self_attn", None)
        if attn is None or any(not hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"block {i} has no q/k/v/o projections"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"block {i} normalises queries and keys (not a Llama block)"
    return None


def _rms_norm_classes() -> tuple[type, ...]:
    """transformers' RMSNorm classes whose forward small_ops.rms_norm_reference restates."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    return LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm


def _plain(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """The module is one of `classes`, with its class's forward and no hooks (nothing a fused
    kernel would skip)."""
    hooks = (module._forward_hooks, module._forward_pre_hooks)
    return type(module) in classes and "forward" not in vars(module) and not any(hooks)


def fused_reason(model: nn.Module) -> str | None:
    """Why LlamaStep cannot run this model with the fused small ops (None: it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    inner, classes = model.model, _rms_norm_classes()
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in FUSED_DTYPES:
        return f"the model's dtype is {dtype}, not fp16 or bf16"
    norms = [inner.norm] + [n for b in inner.layers for n in (b.input_layernorm, b.post_attention_layernorm)]
    for norm in norms:
        if not _plain(norm, classes) or norm.weight.dtype != dtype:
            return f"{type(norm).__name__} is not a plain transformers RMSNorm in {dtype}"
    return None


class LlamaStep:
    """The forward of one model against one SlotCache. Holds references to the model's modules;
    owns no weights.

    fused: run the fused small ops (ValueError if `fused_reason` names a reason; on the CPU only
    under TRITON_INTERPRET=1). Off by default (`ServeConfig.fused_small_ops`)."""

    def __init__(self, model: nn.Module, max_len: int, fused: bool = False) -> None:
        reason = unsupported_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"cannot run this model on the slot cache: {reason}")
        config, inner = model.config, model.model
        self.model, self.inner, self.blocks = model, inner, list(inner.layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = float(getattr(self.blocks[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.inv_freq = inner.rotary_emb.inv_freq  # [d / 2] float32 (any static scaling already applied)
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.max_len = max_len
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = inner.embed_tokens.weight.device
        self.fused = self._use_fused(fused)

    def _use_fused(self, fused: bool) -> bool:
        if not fused:
            return False
        reason = fused_reason(self.model)
        if reason is not None:
            raise ValueError(f"cannot run the fused small ops: {reason}")
        return True

    def new_cache(self, slots: int) -> SlotCache:
        return SlotCache(len(self.blocks), slots, self.kv_heads, self.head_dim, self.max_len, self.dtype, self.device)

    def cache_bytes(self, slots: int) -> int:
        return SlotCache.nbytes(len(self.blocks), slots, self.kv_heads, self.head_dim, self.max_len, self.dtype)

    def forward(self, cache: SlotCache, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor,
                last: torch.Tensor, width: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Run n rows of T tokens; logits [n, V] float32 of each row's token `last[row]`.

        ids, pos, write: [n, T] int64: token ids, their positions (RoPE; token t of a row attends
        to columns 0..pos[t] of its slot), and the cache column each token's K/V is written to
        (its position, or `cache.scratch` for padding). last: [n] int64, an index into T.
        slots: [n] int64, the rows' slots; None: rows 0..n-1 are slots 0..n-1 (a decode step,
        which then reads the cache through views). width: columns read, > every real position.
        The caller makes columns [0, width) readable first (`cache.ready`)."""
        n, T = ids.shape
        cols = torch.arange(width, device=ids.device)
        # [n, 1, 1, T, W] True where token t must not see column w (causal, per row); built once per
        # step, not per block, and applied in place to each block's scores
        hidden = (cols.view(1, 1, width) > pos.unsqueeze(-1)).view(n, 1, 1, T, width)
        rows = (torch.arange(n, device=ids.device) if slots is None else slots).unsqueeze(1).expand(n, T)
        cos, sin = self._rope(pos)
        h, delta = self.inner.embed_tokens(ids), None  # [n, T, H]; delta: the last MLP's output, not yet added
        for i, block in enumerate(self.blocks):
            h, x = self._add_norm(h, delta, block.input_layernorm)
            a = self._attention(block.self_attn, x, cos, sin, hidden, cache.k[i], cache.v[i], rows, write,
                                width, slots)
            h, x = self._add_norm(h, a, block.post_attention_layernorm)
            delta = block.mlp(x)
        h = (h + delta)[torch.arange(n, device=ids.device), last]  # [n, H]: only the tokens whose logits are wanted
        return self.model.lm_head(self._add_norm(h, None, self.inner.norm)[1]).float()

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                  norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)) of h, delta [..., H] (delta None: h, norm(h))."""
        if self.fused:
            from ..kernels import small_ops
            return small_ops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
        h = h if delta is None else h + delta
        return h, norm(h)

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, T, d] in the model's dtype, computed as transformers does (float32 angles)."""
        freqs = pos.unsqueeze(-1).float() * self.inv_freq.to(pos.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   hidden: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                   write: torch.Tensor, width: int, slots: torch.Tensor | None) -> torch.Tensor:
        """o_proj(attention) [n, T, H] of x [n, T, H]; writes this step's K/V into the cache first."""
        n, T, _ = x.shape
        d, kv = self.head_dim, self.kv_heads
        if self.fused:  # one launch: RoPE of q and k, q times the scale, both cache writes
            from ..kernels import small_ops
            q = small_ops.rope_qkv_cache(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), cos, sin, self.scale,
                                         k_cache, v_cache, rows, write)
        else:
            q = attn.q_proj(x).view(n, T, self.heads, d).transpose(1, 2)  # [n, nh, T, d]
            k = attn.k_proj(x).view(n, T, kv, d).transpose(1, 2)  # [n, kv, T, d]
            v = attn.v_proj(x).view(n, T, kv, d).transpose(1, 2)
            q, k = _rotate(q, cos, sin) * self.scale, _rotate(k, cos, sin)
            # one scatter per buffer: token t of row r goes to column write[r, t] of slot rows[r, t]
            k_cache[rows, :, write] = k.transpose(1, 2)
            v_cache[rows, :, write] = v.transpose(1, 2)
        if slots is None:  # a decode step: rows are the first n slots, read in place
            keys, values = k_cache[:n, :, :width], v_cache[:n, :, :width]
        else:
            keys, values = k_cache[:, :, :width].index_select(0, slots), v_cache[:, :, :width].index_select(0, slots)
        out = _attend(q, keys, values, hidden)  # [n, nh, T, d]
        return attn.o_proj(out.transpose(1, 2).reshape(n, T, self.heads * d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [n, heads, T, d] with cos, sin [n, T, d] (transformers' rotate_half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: q [n, nh, T, d] (already scaled), keys / values [n, kv, W, d],
    hidden [n, 1, 1, T, W] bool (True: masked out) -> [n, nh, T, d].

    The nh / kv query heads that share a key-value head are stacked along the token axis, so
    K and V are never repeated. Softmax in float32, as transformers' eager attention does."""
    n, nh, T, d = q.shape
    kv, width = keys.shape[1], keys.shape[2]
    group = nh // kv
    scores = q.reshape(n, kv, group * T, d) @ keys.transpose(-1, -2)  # [n, kv, group*T, W]
    scores = scores.view(n, kv, group, T, width).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs.view(n, kv, group * T, width) @ values).view(n, nh, T, d)
