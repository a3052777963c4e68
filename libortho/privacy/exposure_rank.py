"""Exposure (Carlini et al. 2019, "The Secret Sharer") of a canary's secret, in bits.

* :func:`secret_logprobs`: log p(candidate | prefix) in nats, the prefix run once and its KV
  cache reused for every candidate.
* :func:`exposure`: log2|R| - log2 rank(secret), by an exact branch-and-bound rank over the
  digit trie, full enumeration, a sampled rank or the skew-normal extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from ..records import CanaryRecord, SecretFormat, _as_rng, parse_format, sample_candidates
from ..hf_model import module_device
from .forward import CANDIDATE_BATCH_SIZE, KV, Context, cache_to_kv, kv_concat, kv_to_cache, lm_forward, run_context, split_continuations

__all__ = ["secret_logprobs", "ExposureResult", "exposure", "exposure_from_scores"]

@torch.inference_mode()
def _score_continuations(
    model: torch.nn.Module, ctx: Context, continuations: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """Sum of log p(continuation tokens | context), float64 [n] (0 for an empty continuation)."""
    device = module_device(model)
    scores = torch.zeros(len(continuations), dtype=torch.float64)
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start : start + batch_size]
        lengths = torch.tensor([len(c) for c in chunk])
        width = int(lengths.max())
        if width == 0:
            continue
        # Right padding needs no attention mask: causal attention never looks at later pads.
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, cont in enumerate(chunk):
            ids[row, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        ids = ids.to(device)
        first = ctx.next_logprobs[ids[:, 0]].double().cpu()
        total = torch.where(lengths > 0, first, torch.zeros_like(first))
        if width > 1:
            cache = kv_to_cache(kv_concat(ctx.kv, None, len(chunk)))
            logits, _ = lm_forward(model, ids[:, :-1], cache)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, ids[:, 1:, None])[..., 0].double().cpu()  # [B, width-1]
            valid = torch.arange(1, width)[None, :] < lengths[:, None]
            total = total + (picked * valid).sum(dim=1)
        scores[start : start + len(chunk)] = total
    return scores


EXPOSURE_CANDIDATES = 1000  # random candidates for the sampled / skew-normal exposure estimates
FRONTIER_CAP = 256  # digit-trie nodes kept per depth before sub-sampling


def secret_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    prefix: str,
    candidates: Sequence[str],
    batch_size: int = CANDIDATE_BATCH_SIZE,
) -> torch.Tensor:
    """log p(candidate | prefix) in nats for each candidate: float64 tensor [n] on CPU.

    The shared prefix runs once; its KV cache is broadcast over each batch of candidates.
    Prefix and candidate are tokenized jointly; when the tokenizer merges across the boundary
    the score is log p(tokens after the part all candidates share), comparable across them.
    Full-attention decoders (Llama / SmolLM2 / Qwen2 / GPT-2 style DynamicCache).
    """
    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.float64)
    shared, continuations = split_continuations(tokenizer, prefix, candidates)
    ctx = run_context(model, shared)
    return _score_continuations(model, ctx, continuations, batch_size)


@dataclass
class ExposureResult:
    """Exposure of one canary. ``rank``: 1 = best; estimates may be fractional.

    ``method``: ``exact`` (digit-trie branch and bound), ``trie-sampled`` (trie with
    sub-sampled frontiers, unbiased rank estimate), ``enumeration`` (all of R scored),
    ``sampled-rank`` (1 + fraction of random candidates better x |R|), ``skewnorm``
    (Secret Sharer extrapolation; exposure may exceed log2|R|).
    """

    exposure: float  # bits
    rank: float
    method: str
    log2_space: float  # bits
    secret_logprob: float  # nats, log p(secret continuation | prefix) under the method's scoring
    n_scored: int  # trie nodes expanded or candidates scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_tie_tol(model: torch.nn.Module) -> float:
    # Batched and unbatched forwards differ by float noise; scores this close count as ties.
    dtype = next(model.parameters()).dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _rank_from_counts(better: float, ties: float) -> float:
    """Ties count half: the expected rank when ties are broken at random."""
    return 1.0 + better + 0.5 * ties


def exposure_from_scores(
    secret_score: float, candidate_scores: np.ndarray, log2_space: float, tie_tol: float = 1e-4
) -> tuple[float, float]:
    """(exposure bits, rank) when ``candidate_scores`` are ALL other members of R (exact)."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    better = float(np.sum(scores > secret_score + tie_tol))
    ties = float(np.sum(np.abs(scores - secret_score) <= tie_tol))
    rank = _rank_from_counts(better, ties)
    return log2_space - math.log2(rank), rank


@dataclass
class _DigitPlan:
    """How a digit secret tokenizes after its prefix: shared + boundary + one token per digit."""

    shared: list[int]
    boundary: list[int]
    digit_ids: list[int]  # token id of each alphabet character, in alphabet order


def _digit_plan(tokenizer: Any, prefix: str, spec: SecretFormat, secret: str) -> _DigitPlan | None:
    """Check that every candidate tokenizes as a fixed boundary + one token per character
    (true for SmolLM2 / Llama-style digit splitting); None if not, e.g. GPT-2 merges digits."""
    n = spec.length
    uniform = [c * n for c in spec.alphabet]
    probes = uniform + [secret] + sample_candidates(f"{spec.kind}:{n}", 8, rng=12345)
    try:
        shared, conts = split_continuations(tokenizer, prefix, probes)
    except ValueError:
        return None
    if any(len(c) != len(conts[0]) or len(c) < n for c in conts):
        return None
    b = len(conts[0]) - n
    boundary = conts[0][:b]
    digit_ids = []
    for cont in conts[: len(uniform)]:
        tail = cont[b:]
        if len(set(tail)) != 1:
            return None
        digit_ids.append(tail[0])
    if len(set(digit_ids)) != len(digit_ids):
        return None
    index = {c: i for i, c in enumerate(spec.alphabet)}
    for probe, cont in zip(probes, conts):
        if cont[:b] != boundary or cont[b:] != [digit_ids[index[c]] for c in probe]:
            return None
    return _DigitPlan(shared, boundary, digit_ids)


@dataclass
class _Frontier:
    """Trie nodes at one depth: partial log-prob, sampling weight, next-char log-probs, suffix KV."""

    paths: torch.Tensor  # long [M, depth], alphabet indices
    logp: torch.Tensor  # float64 [M], sum of log p of the path's characters
    weight: torch.Tensor  # float64 [M], inverse inclusion probability (1 when exact)
    next_logprobs: torch.Tensor  # float64 [M, A]
    suffix: KV  # per layer [M, heads, boundary + depth, head_dim]


@torch.inference_mode()
def _trie_root(model: torch.nn.Module, plan: _DigitPlan) -> tuple[Context, _Frontier]:
    ctx = run_context(model, plan.shared)
    digit_ids = torch.tensor(plan.digit_ids)
    if plan.boundary:
        ids = torch.tensor([plan.boundary], device=module_device(model))
        logits, cache = lm_forward(model, ids, kv_to_cache(kv_concat(ctx.kv, None, 1)))
        next_lp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        shared_len = len(plan.shared)
        suffix = [(k[:, :, shared_len:], v[:, :, shared_len:]) for k, v in cache_to_kv(cache)]
    else:
        next_lp = ctx.next_logprobs
        suffix = [(k[:, :, :0], v[:, :, :0]) for k, v in ctx.kv]
    root = _Frontier(
        paths=torch.zeros(1, 0, dtype=torch.long),
        logp=torch.zeros(1, dtype=torch.float64),
        weight=torch.ones(1, dtype=torch.float64),
        next_logprobs=next_lp[digit_ids.to(next_lp.device)].double().cpu()[None, :],
        suffix=suffix,
    )
    return ctx, root


@torch.inference_mode()
def _expand(
    model: torch.nn.Module,
    ctx: Context,
    frontier: _Frontier,
    parent: torch.Tensor,
    char: torch.Tensor,
    weight: torch.Tensor,
    digit_ids: torch.Tensor,
    batch_size: int,
) -> _Frontier:
    """Run one token (the chosen child character) for each (parent, char) pair, with the
    parent's cached suffix: every node costs a single-token forward."""
    device = module_device(model)
    next_lps, suffix_parts = [], []
    for start in range(0, len(parent), batch_size):
        rows = parent[start : start + batch_size]
        suffix = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in frontier.suffix]
        cache = kv_to_cache(kv_concat(ctx.kv, suffix, len(rows)))
        ids = digit_ids[char[start : start + batch_size]][:, None].to(device)
        logits, new_cache = lm_forward(model, ids, cache)
        lp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        next_lps.append(lp[:, digit_ids.to(lp.device)].double().cpu())
        shared_len = ctx.kv[0][0].shape[2]
        suffix_parts.append([(k[:, :, shared_len:], v[:, :, shared_len:]) for k, v in cache_to_kv(new_cache)])
    n_layers = len(frontier.suffix)
    return _Frontier(
        paths=torch.cat([frontier.paths[parent], char[:, None]], dim=1),
        logp=frontier.logp[parent] + frontier.next_logprobs[parent, char],
        weight=weight,
        next_logprobs=torch.cat(next_lps),
        suffix=[
            (torch.cat([p[i][0] for p in suffix_parts]), torch.cat([p[i][1] for p in suffix_parts]))
            for i in range(n_layers)
        ],
    )


@torch.inference_mode()
def _secret_score_in_trie(
    model: torch.nn.Module, ctx: Context, root: _Frontier, plan: _DigitPlan, secret_idx: list[int]
) -> float:
    """log p(secret characters | prefix, boundary): the same quantity the trie sums."""
    digit_ids = torch.tensor(plan.digit_ids)
    total = float(root.next_logprobs[0, secret_idx[0]])
    if len(secret_idx) > 1:
        ids = digit_ids[torch.tensor(secret_idx[:-1])][None, :].to(module_device(model))
        cache = kv_to_cache(kv_concat(ctx.kv, root.suffix, 1))
        logits, _ = lm_forward(model, ids, cache)
        lp = torch.log_softmax(logits[0].float(), dim=-1).double().cpu()  # [N-1, V]
        for pos, ch in enumerate(secret_idx[1:]):
            total += float(lp[pos, plan.digit_ids[ch]])
    return total


def _survivors(
    frontier: _Frontier, target: float, tie_tol: float, cap: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Children whose partial log-prob can still beat or tie ``target``: (parent row, char,
    weight, subsampled). More than ``cap`` survivors: a uniform subset of ``cap``, each
    weighted up by survivors / cap so that weighted counts stay unbiased."""
    child = frontier.logp[:, None] + frontier.next_logprobs  # [M, A]
    keep = (child >= target - tie_tol).flatten().nonzero()[:, 0]
    parent, char = keep // child.shape[1], keep % child.shape[1]
    weight = frontier.weight[parent]
    if len(keep) <= cap:
        return parent, char, weight, False
    choice = torch.from_numpy(np.sort(rng.choice(len(keep), size=cap, replace=False)))
    return parent[choice], char[choice], weight[choice] * (len(keep) / cap), True


def _count_leaves(frontier: _Frontier, target: float, secret_idx: list[int], tie_tol: float) -> tuple[float, float]:
    """Weighted counts of complete candidates (children of the last frontier) that beat or
    tie ``target``, the secret itself excluded."""
    child = frontier.logp[:, None] + frontier.next_logprobs  # [M, A]
    own = torch.zeros_like(child, dtype=torch.bool)
    is_secret_parent = (frontier.paths == torch.tensor(secret_idx[:-1])[None, :]).all(dim=1)
    own[is_secret_parent, secret_idx[-1]] = True
    weight = frontier.weight[:, None].expand_as(child)
    better = float((weight * ((child > target + tie_tol) & ~own)).sum())
    ties = float((weight * (((child - target).abs() <= tie_tol) & ~own)).sum())
    return better, ties


def _trie_exposure(
    model: torch.nn.Module,
    plan: _DigitPlan,
    spec: SecretFormat,
    secret: str,
    frontier_cap: int,
    tie_tol: float,
    batch_size: int,
    rng: np.random.Generator,
) -> ExposureResult:
    """Branch and bound over the character trie.

    Adding a character only lowers a partial log-prob, so a node whose partial sum is already
    below the secret's score (minus ``tie_tol``) cannot lead to a better or tied candidate and
    is pruned. If more than ``frontier_cap`` nodes survive at a depth, a uniform random subset
    of ``frontier_cap`` is kept and weighted by survivors / kept (Knuth-style unbiased count):
    the method becomes ``trie-sampled``. Ties (|score - secret| <= tie_tol) count half.
    """
    index = {c: i for i, c in enumerate(spec.alphabet)}
    secret_idx = [index[c] for c in secret]
    ctx, frontier = _trie_root(model, plan)
    target = _secret_score_in_trie(model, ctx, frontier, plan, secret_idx)
    digit_ids = torch.tensor(plan.digit_ids)
    expanded, sampled = 1, False
    better = ties = 0.0
    for depth in range(spec.length):
        if depth == spec.length - 1:
            better, ties = _count_leaves(frontier, target, secret_idx, tie_tol)
            break
        parent, char, weight, subsampled = _survivors(frontier, target, tie_tol, frontier_cap, rng)
        if len(parent) == 0:  # nothing left that could beat or tie the secret
            break
        sampled |= subsampled
        frontier = _expand(model, ctx, frontier, parent, char, weight, digit_ids, batch_size)
        expanded += len(parent)
    rank = _rank_from_counts(better, ties)
    return ExposureResult(
        exposure=spec.log2_size - math.log2(rank),
        rank=rank,
        method="trie-sampled" if sampled else "exact",
        log2_space=spec.log2_size,
        secret_logprob=target,
        n_scored=expanded,
    )


def _enumerate_all(spec: SecretFormat) -> list[str]:
    import itertools

    return ["".join(t) for t in itertools.product(spec.alphabet, repeat=spec.length)]


def _skewnorm_exposure(secret_score: float, sample_scores: np.ndarray) -> tuple[float, float]:
    """Secret Sharer extrapolation: exposure = -log2 P(X >= secret score), X ~ fitted skew-normal."""
    params = stats.skewnorm.fit(sample_scores)
    log_sf = float(stats.skewnorm.logsf(secret_score, *params))
    return -log_sf / math.log(2), log_sf


def exposure(
    model: torch.nn.Module,
    tokenizer: Any,
    record: CanaryRecord,
    *,
    n_samples: int = EXPOSURE_CANDIDATES,
    frontier_cap: int = FRONTIER_CAP,
    enumerate_limit: int = 2048,
    sampled_rank_max_space: int = 10**6,
    batch_size: int = CANDIDATE_BATCH_SIZE,
    rng: np.random.Generator | int | None = None,
    tie_tol: float | None = None,
) -> ExposureResult:
    """Exposure (bits) = log2|R| - log2 rank(secret), candidates ranked by log p(. | prefix).

    Method, in order of preference:
    1. ``digits:N`` when every digit is a single token (SmolLM2, Llama): branch and bound over the
       trie (exact unless a depth has more than ``frontier_cap`` surviving nodes, which
       gives the unbiased ``trie-sampled`` estimate; cost <= length x frontier_cap
       single-token forwards);
    2. |R| <= ``enumerate_limit``: score every candidate (``enumeration``);
    3. |R| <= ``sampled_rank_max_space``: rank = 1 + fraction of ``n_samples`` random
       candidates scoring better x |R| (``sampled-rank``; resolution |R| / n_samples);
    4. otherwise the skew-normal fit of ``n_samples`` random candidates (``skewnorm``).
    """
    spec = parse_format(record.secret_format)
    if not spec.contains(record.secret):
        raise ValueError(f"record {record.id!r}: secret is not in format {record.secret_format!r}")
    rng = _as_rng(rng)
    tol = _default_tie_tol(model) if tie_tol is None else tie_tol
    # Only digits: pre-tokenizers split them one per token; letters can merge in rare pairs
    # that a few probes would not reveal.
    plan = _digit_plan(tokenizer, record.prefix, spec, record.secret) if spec.kind == "digits" else None
    if plan is not None:
        return _trie_exposure(model, plan, spec, record.secret, frontier_cap, tol, batch_size, rng)

    if spec.size <= enumerate_limit:
        others = [c for c in _enumerate_all(spec) if c != record.secret]
        scores = secret_logprobs(model, tokenizer, record.prefix, [record.secret] + others, batch_size).numpy()
        exp_bits, rank = exposure_from_scores(scores[0], scores[1:], spec.log2_size, tol)
        return ExposureResult(exp_bits, rank, "enumeration", spec.log2_size, float(scores[0]), len(scores))

    samples = [c for c in sample_candidates(record.secret_format, n_samples, rng) if c != record.secret]
    scores = secret_logprobs(model, tokenizer, record.prefix, [record.secret] + samples, batch_size).numpy()
    secret_score, sample_scores = float(scores[0]), scores[1:]
    if spec.size <= sampled_rank_max_space:
        better = np.mean(sample_scores > secret_score + tol)
        ties = np.mean(np.abs(sample_scores - secret_score) <= tol)
        rank = _rank_from_counts(float(better) * (spec.size - 1), float(ties) * (spec.size - 1))
        return ExposureResult(
            spec.log2_size - math.log2(rank), rank, "sampled-rank", spec.log2_size, secret_score, len(scores)
        )
    exp_bits, log_sf = _skewnorm_exposure(secret_score, sample_scores)
    rank = math.exp(log_sf + spec.length * math.log(len(spec.alphabet)))
    return ExposureResult(exp_bits, rank, "skewnorm", spec.log2_size, secret_score, len(scores))
