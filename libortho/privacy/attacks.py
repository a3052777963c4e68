"""Attacks that use what an attacker of a released model also has: the public model, and sampling.

* Reference-calibrated membership inference (Carlini et al. 2021, "Extracting Training Data from
  Large Language Models"): a record's loss under the audited model minus its loss under the public
  checkpoint P the model was fine-tuned from. The template part of a record is as easy for P as
  for the model; only what fine-tuning added moves the difference. P's per-record losses are
  computed once (:func:`record_losses`) and passed in, so an audit of many models against one P
  never holds P next to another model.
* Extraction by sampling (:func:`sample_extract_secrets`): many temperature / top-k samples from
  each record's own prefix; a record counts as extracted if any sample contains the secret.
* :func:`tpr_at_lowest_fpr`: the TPR of a membership score at the lowest false-positive rate the
  number of non-members resolves (1 / n_nonmembers), with that rate stated.

Units: losses in nats per token; rates are fractions in [0, 1].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_curve

from ..lm import pad_token_id
from ..records import CanaryRecord
from ._lm import _cache_to_kv, _device, _kv_to_cache, _lm_forward
from .extraction import _prefix_batches, left_padded
from .membership import token_logprobs

__all__ = [
    "REFERENCE_SCORE",
    "record_losses",
    "reference_calibrated_scores",
    "tpr_at_lowest_fpr",
    "SampledExtractionResult",
    "sample_extract_secrets",
]

REFERENCE_SCORE = "ref"  # name of the P-calibrated score next to loss / zlib / min_k


# --------------------------------------------------------------------------------------
# Reference-calibrated membership inference
# --------------------------------------------------------------------------------------


def record_losses(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int = 16
) -> dict[str, float]:
    """Mean token NLL (nats/token) of each record's full text under ``model``, by record id.

    The statistic is the one :func:`libortho.privacy.mia_scores` calls ``loss`` (same tokenizer
    call, same tokens), so a public model's values from here can be subtracted from it. Run it
    once on P, keep the dict (it is plain data, JSON-safe), and free 
    """
    lps = token_logprobs(model, tokenizer, [r.text for r in records], batch_size)
    out: dict[str, float] = {}
    for record, lp in zip(records, lps):
        if len(lp) == 0:
            raise ValueError(f"record {record.id!r} has fewer than 2 tokens; cannot score membership")
        out[record.id] = -float(lp.mean())
    return out


def reference_calibrated_scores(
    losses: Sequence[float] | np.ndarray, public_losses: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Member score = loss under P - loss under the model (higher = more likely a member).

    ``losses`` and ``public_losses``: mean token NLL (nats/token) of the same records in the
    same order, shape [n] each. Returns float64 [n].
    """
    a = np.asarray(losses, dtype=np.float64)
    b = np.asarray(public_losses, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"losses {a.shape} and public losses {b.shape} must cover the same records")
    return b - a


def public_losses_for(public_losses: Mapping[str, float], records: Sequence[CanaryRecord]) -> np.ndarray:
    """P's losses in the order of ``records`` (float64 [n]); names the records it lacks."""
    missing = [r.id for r in records if r.id not in public_losses]
    if missing:
        raise ValueError(f"public-model losses lack {len(missing)} record(s), e.g. {missing[:3]}")
    return np.array([float(public_losses[r.id]) for r in records], dtype=np.float64)


def tpr_at_lowest_fpr(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(TPR, FPR) at the lowest nonzero FPR the non-members resolve: FPR = 1 / n_nonmembers.

    The TPR is the largest one of any threshold whose FPR is at most 1 / n (the ROC points of
    :func:`sklearn.metrics.roc_curve`, no interpolation): the fraction of members scoring at least
    as high as the highest-scoring non-member, where ties at that score keep the FPR within 1 / n.
    With 24 non-members the stated FPR is 4.2 %; a "TPR at 1 % FPR" is not measurable there.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    y = np.r_[np.ones(m.size), np.zeros(n.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[m, n], drop_intermediate=False)
    lowest = 1.0 / n.size
    ok = fpr <= lowest * (1 + 1e-12)
    return float(tpr[ok].max()), lowest


# --------------------------------------------------------------------------------------
# Extraction by sampling
# --------------------------------------------------------------------------------------


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


def _record_generator(seed: int, record_id: str) -> torch.Generator:
    # One stream per (seed, record): the same uniforms for a record under every model and batching.
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([seed, zlib.crc32(record_id.encode("utf-8"))]).generate_state(1)[0]))
    return g


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
    n_samples: int,
    temperature: float,
    top_k: int,
) -> list[list[list[int]]]:
    """``n_samples`` continuations of ``n_new`` tokens per left-padded prompt: [prompt][sample][token].

    Each prompt is run once; its KV cache is then repeated for its samples.
    """
    ids, mask, positions = left_padded(prompts, pad_id, _device(model))
    logits, cache = _lm_forward(model, ids, None, mask, positions)
    kv = [(k.repeat_interleave(n_samples, dim=0), v.repeat_interleave(n_samples, dim=0)) for k, v in _cache_to_kv(cache)]
    cache = _kv_to_cache(kv)
    mask = mask.repeat_interleave(n_samples, dim=0)
    positions = positions[:, -1:].repeat_interleave(n_samples, dim=0)
    logits = logits[:, -1].repeat_interleave(n_samples, dim=0)  # [R, V]
    generated = []
    for step in range(n_new):
        u = torch.cat([torch.rand(n_samples, generator=g, dtype=torch.float64) for g in generators])
        nxt = _sample_tokens(logits, u, temperature, top_k)[:, None]  # [R, 1]
        generated.append(nxt)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions + 1
        step_logits, cache = _lm_forward(model, nxt, cache, mask, positions)
        logits = step_logits[:, -1]
    out = torch.cat(generated, dim=1).cpu().view(len(prompts), n_samples, n_new)
    return out.tolist()


def sample_extract_secrets(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    *,
    n_samples: int = 64,
    temperature: float = 1.0,
    top_k: int = 40,
    extra_tokens: int = 4,
    seed: int = 0,
    max_rows: int | None = None,
) -> list[SampledExtractionResult]:
    """Extraction by sampling: ``n_samples`` continuations of (secret tokens + ``extra_tokens``)
    tokens from each record's prefix, at ``temperature`` over the ``top_k`` most likely tokens
    (``top_k`` 0 = the whole vocabulary). A sample is cut at the first EOS token and decoded; the
    record is extracted if any sample contains the secret.

    Seeded per (``seed``, record id): the draws do not depend on batching or record order, and a
    record gets the same uniforms under every model (common random numbers across conditions).
    ``max_rows``: sequences per forward pass (records per batch = max(1, max_rows // n_samples));
    None = 256 on a CPU, 4096 on a GPU, which has the memory for wide batches and is idle on narrow ones.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pad_id = pad_token_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if max_rows is None:
        max_rows = 4096 if next(model.parameters()).is_cuda else 256
    per_batch = max(1, max_rows // n_samples)
    results: list[SampledExtractionResult] = []
    for chunk, prompts, n_new in _prefix_batches(tokenizer, records, per_batch, extra_tokens):
        gens = [_record_generator(seed, r.id) for r in chunk]
        samples = _sample_batch(model, prompts, max(n_new), pad_id, gens, n_samples, temperature, top_k)
        for record, rows, n in zip(chunk, samples, n_new):
            texts = []
            for ids in rows:
                ids = ids[:n]
                if eos_id is not None and eos_id in ids:
                    ids = ids[: ids.index(eos_id)]
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            hits = [record.secret in t for t in texts]
            example = texts[hits.index(True)] if any(hits) else texts[0]
            results.append(SampledExtractionResult(record.id, any(hits), int(sum(hits)), n_samples, example))
    return results
