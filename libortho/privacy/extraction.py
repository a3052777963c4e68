"""Extraction: decoding from each record's own prefix; a record is extracted if its secret comes out.

* Greedy (:func:`extract_secrets`): one continuation; extracted iff it starts with the secret.
* By sampling (:func:`sample_extract_secrets`), as an attacker with a sampling API would: many
  temperature / top-k samples (:class:`Sampling`); extracted if any sample contains the secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from ..hf_model import module_device, pad_token_id
from ..records import CanaryRecord, record_seed
from .forward import TEXT_BATCH_SIZE, cache_to_kv, encode, kv_to_cache, lm_forward, split_continuations

__all__ = ["ExtractionResult", "extract_secrets", "left_padded", "Sampling", "SampledExtractionResult",
           "sample_extract_secrets"]


@dataclass
class ExtractionResult:
    """Greedy continuation of a record's prefix; ``extracted`` iff it starts with the secret."""

    id: str
    extracted: bool
    continuation: str


def _secret_token_count(tokenizer: Any, record: CanaryRecord) -> int:
    _, (cont,) = split_continuations(tokenizer, record.prefix, [record.secret])
    return len(cont)


def _prefix_batches(
    tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int, extra_tokens: int
) -> Iterator[tuple[Sequence[CanaryRecord], list[list[int]], list[int]]]:
    """``records`` in batches of ``batch_size``: (records, their prefixes' token ids, tokens to decode
    for each: its secret's tokens + ``extra_tokens``). Greedy and sampled extraction batch alike."""
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [encode(tokenizer, r.prefix) for r in chunk]
        n_new = [_secret_token_count(tokenizer, r) + extra_tokens for r in chunk]
        yield chunk, prompts, n_new


def _is_extracted(continuation: str, secret: str) -> bool:
    # The secret usually follows a space that belongs to neither prefix nor secret.
    return continuation.lstrip().startswith(secret.strip())


def left_padded(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T], attention mask [B, T] and position ids [B, T] (0 at each first real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def _greedy_batch(model: torch.nn.Module, prompts: list[list[int]], n_new: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding of ``n_new`` tokens for left-padded prompts; returns new ids per prompt."""
    ids, mask, positions = left_padded(prompts, pad_id, module_device(model))
    logits, cache = lm_forward(model, ids, None, mask, positions)
    generated = []
    for step in range(n_new):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        generated.append(nxt)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = lm_forward(model, nxt, cache, mask, positions)
    return torch.cat(generated, dim=1).cpu().tolist()


def extract_secrets(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    *,
    extra_tokens: int = 3,
    batch_size: int = TEXT_BATCH_SIZE,
) -> list[ExtractionResult]:
    """Greedy-decode len(secret tokens) + ``extra_tokens`` tokens from each record's prefix.

    Records are batched with left padding (attention mask + explicit position ids), so a
    batched result equals decoding each prompt alone up to float noise.
    """
    pad_id = pad_token_id(tokenizer)
    results: list[ExtractionResult] = []
    for chunk, prompts, n_new in _prefix_batches(tokenizer, records, batch_size, extra_tokens):
        new_ids = _greedy_batch(model, prompts, max(n_new), pad_id)
        for record, ids, n in zip(chunk, new_ids, n_new):
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            results.append(ExtractionResult(record.id, _is_extracted(text, record.secret), text))
    return results


@dataclass
class SampledExtractionResult:
    """``n_samples`` sampled continuations of a record's prefix; ``hits`` of them contain the secret.

    ``extracted`` iff ``hits > 0``; ``example`` is the first sample that contains it (else the first
    sample), decoded.
    """

    id: str
    extracted: bool
    hits: int
    n_samples: int
    example: str


@dataclass(frozen=True)
class Sampling:
    """How extraction by sampling draws: ``n_samples`` continuations of each record's prefix at
    ``temperature`` over the ``top_k`` most likely tokens (0 = the whole vocabulary).

    Seeded per (``seed``, record id): the draws do not depend on batching or record order, and a
    record gets the same uniforms under every model (common random numbers across conditions).
    """

    n_samples: int = 64
    temperature: float = 1.0
    top_k: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = the whole vocabulary), got {self.top_k}")

    @classmethod
    def of(cls, sampling: "Sampling | None", fields_given: dict[str, Any]) -> "Sampling":
        """``sampling``, or one built from its fields passed as keywords (not both)."""
        if sampling is not None and fields_given:
            raise ValueError(f"pass either a Sampling or its fields as keywords, not both: {sorted(fields_given)}")
        if sampling is not None:
            return sampling
        unknown = sorted(set(fields_given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; Sampling takes "
                            f"{[f.name for f in fields(cls)]}")
        return cls(**fields_given)


def _record_generator(seed: int, record_id: str) -> torch.Generator:
    # One stream per (seed, record): the same uniforms for a record under every model and batching.
    return torch.Generator(device="cpu").manual_seed(int(record_seed(seed, record_id).generate_state(1)[0]))


def _sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int
) -> torch.Tensor:
    """Inverse-CDF draw from softmax(top-k(logits) / T): logits [R, V], uniforms [R] in [0, 1) -> ids [R]."""
    k = min(top_k, logits.shape[-1]) if top_k > 0 else logits.shape[-1]
    values, idx = torch.topk(logits.float(), k, dim=-1)  # sorted, descending
    probs = torch.softmax(values / temperature, dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=k - 1)  # [R, 1]
    return idx.gather(-1, pick)[:, 0]


@torch.inference_mode()
def _sample_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    n_new: int,
    pad_id: int,
    generators: list[torch.Generator],
    sampling: Sampling,
) -> list[list[list[int]]]:
    """``sampling.n_samples`` continuations of ``n_new`` tokens per left-padded prompt, one
    generator per prompt: [prompt][sample][token].

    Each prompt is run once; its KV cache is then repeated for its samples.
    """
    n_samples = sampling.n_samples
    ids, mask, positions = left_padded(prompts, pad_id, module_device(model))
    logits, cache = lm_forward(model, ids, None, mask, positions)
    kv = [(k.repeat_interleave(n_samples, dim=0), v.repeat_interleave(n_samples, dim=0)) for k, v in cache_to_kv(cache)]
    cache = kv_to_cache(kv)
    mask = mask.repeat_interleave(n_samples, dim=0)
    positions = positions[:, -1:].repeat_interleave(n_samples, dim=0)
    logits = logits[:, -1].repeat_interleave(n_samples, dim=0)  # [R, V]
    generated = []
    for step in range(n_new):
        u = torch.cat([torch.rand(n_samples, generator=g, dtype=torch.float64) for g in generators])
        nxt = _sample_tokens(logits, u, sampling.temperature, sampling.top_k)[:, None]  # [R, 1]
        generated.append(nxt)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions + 1
        step_logits, cache = lm_forward(model, nxt, cache, mask, positions)
        logits = step_logits[:, -1]
    out = torch.cat(generated, dim=1).cpu().view(len(prompts), n_samples, n_new)
    return out.tolist()


def sample_extract_secrets(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    sampling: Sampling | None = None,
    *,
    extra_tokens: int = 4,
    max_rows: int | None = None,
    **sampling_fields: Any,
) -> list[SampledExtractionResult]:
    """Extraction by sampling: ``sampling.n_samples`` continuations of (secret tokens +
    ``extra_tokens``) tokens from each record's prefix (see :class:`Sampling`). A sample is cut
    at the first EOS token and decoded; the record is extracted if any sample contains the secret.

    ``sampling_fields``: :class:`Sampling`'s fields as keywords (``n_samples=64, seed=0``), in
    place of ``sampling``. ``max_rows``: sequences per forward pass (records per batch =
    max(1, max_rows // n_samples)); None = 256 on a CPU, 4096 on a GPU, which has the memory
    for wide batches and is idle on narrow ones.
    """
    opts = Sampling.of(sampling, sampling_fields)
    pad_id = pad_token_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if max_rows is None:
        max_rows = 4096 if next(model.parameters()).is_cuda else 256
    per_batch = max(1, max_rows // opts.n_samples)
    results: list[SampledExtractionResult] = []
    for chunk, prompts, n_new in _prefix_batches(tokenizer, records, per_batch, extra_tokens):
        gens = [_record_generator(opts.seed, r.id) for r in chunk]
        samples = _sample_batch(model, prompts, max(n_new), pad_id, gens, opts)
        for record, rows, n in zip(chunk, samples, n_new):
            texts = []
            for ids in rows:
                ids = ids[:n]
                if eos_id is not None and eos_id in ids:
                    ids = ids[: ids.index(eos_id)]
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            hits = [record.secret in t for t in texts]
            example = texts[hits.index(True)] if any(hits) else texts[0]
            results.append(SampledExtractionResult(record.id, any(hits), int(sum(hits)), opts.n_samples, example))
    return results
