"""Privacy attacks and metrics on a Hugging Face causal LM.

Everything here is a pure function of (model, tokenizer, records): nothing changes the
model (no alpha switching, no mode changes; callers put the model in ``eval()``).

* Canary records (:class:`CanaryRecord`) and their secret formats (``"digits:6"``, ...).
* Scoring: :func:`secret_logprobs` = log p(candidate | prefix), prefix run once, KV cache reused.
* Exposure (Carlini et al. 2019, "The Secret Sharer"): :func:`exposure`, with an exact
  branch-and-bound rank over the digit trie, plus sampled and skew-normal estimates.
* Extraction: :func:`extract_secrets`, greedy decoding from each record's own prefix.
* Membership inference: :func:`mia_scores` (loss, zlib ratio, Min-K% Prob) and
  :func:`mia_metrics` (ROC AUC, TPR at 1 % FPR).
* Forget quality: :func:`forget_quality`, a two-sample KS test against a retrain reference.

Units: log-probabilities and losses are in nats, exposure in bits.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import string
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "CanaryRecord",
    "SecretFormat",
    "parse_format",
    "candidate_space_size",
    "sample_candidates",
    "load_records",
    "save_records",
    "record_from_dict",
    "secret_logprobs",
    "ExposureResult",
    "exposure",
    "exposure_from_scores",
    "ExtractionResult",
    "extract_secrets",
    "token_logprobs",
    "min_k_prob",
    "zlib_entropy",
    "MIAScores",
    "mia_scores",
    "MIAMetrics",
    "mia_metrics",
    "tpr_at_fpr",
    "auc_confidence_interval",
    "paired_auc_difference",
    "KSResult",
    "forget_quality",
    "atomic_write_text",
]

# --------------------------------------------------------------------------------------
# Secret formats
# --------------------------------------------------------------------------------------

ALPHABETS: dict[str, str] = {
    "digits": string.digits,
    "hex": "0123456789abcdef",
    "alnum": string.ascii_letters + string.digits,
    "alpha": string.ascii_letters,
    "lower": string.ascii_lowercase,
    "upper": string.ascii_uppercase,
}

_FORMAT_RE = re.compile(r"^\s*([a-z]+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SecretFormat:
    """A candidate space R = alphabet^length, e.g. ``digits:6`` (|R| = 10^6)."""

    kind: str
    length: int
    alphabet: str

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    @property
    def log2_size(self) -> float:
        return self.length * math.log2(len(self.alphabet))

    def contains(self, secret: str) -> bool:
        return len(secret) == self.length and all(c in self.alphabet for c in secret)


def parse_format(fmt: str) -> SecretFormat:
    """Parse ``"<kind>:<length>"``; kinds: digits, hex (lowercase), alnum, alpha, lower, upper."""
    m = _FORMAT_RE.match(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise ValueError(f"bad secret_format {fmt!r}: expected '<kind>:<length>', e.g. 'digits:6'")
    kind, length = m.group(1), int(m.group(2))
    if kind not in ALPHABETS:
        raise ValueError(f"bad secret_format {fmt!r}: unknown kind {kind!r} (known: {', '.join(ALPHABETS)})")
    if length < 1:
        raise ValueError(f"bad secret_format {fmt!r}: length must be >= 1")
    return SecretFormat(kind, length, ALPHABETS[kind])


def candidate_space_size(fmt: str) -> int:
    """|R| for a secret format (an exact Python int, may be huge)."""
    return parse_format(fmt).size


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_candidates(fmt: str, n: int, rng: np.random.Generator | int | None = None) -> list[str]:
    """n candidates drawn uniformly from R, with replacement (characters i.i.d. uniform)."""
    spec = parse_format(fmt)
    idx = _as_rng(rng).integers(0, len(spec.alphabet), size=(n, spec.length))
    alphabet = np.array(list(spec.alphabet))
    return ["".join(row) for row in alphabet[idx]]


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass
class CanaryRecord:
    """One private record. ``text`` is the full record as trained (default prefix + secret);
    ``k`` is how many times it was inserted into the fine-tuning data (0 = non-member)."""

    id: str
    prefix: str
    secret: str
    secret_format: str
    k: int = 0
    text: str | None = None

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = self.prefix + self.secret

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_REQUIRED_KEYS = ("id", "prefix", "secret", "secret_format")


def record_from_dict(obj: Any, where: str = "record") -> CanaryRecord:
    """Validate one decoded JSON object; errors name ``where`` (e.g. ``file.jsonl:3``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (required: {', '.join(_REQUIRED_KEYS)})")
    for key in _REQUIRED_KEYS:
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    k = obj.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{where}: 'k' must be a non-negative integer, got {k!r}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string or null, got {type(text).__name__}")
    try:
        spec = parse_format(obj["secret_format"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not spec.contains(obj["secret"]):
        raise ValueError(f"{where}: secret {obj['secret']!r} is not in format {obj['secret_format']!r}")
    if not obj["prefix"]:
        raise ValueError(f"{where}: 'prefix' must not be empty")
    return CanaryRecord(obj["id"], obj["prefix"], obj["secret"], obj["secret_format"], k, text)


def load_records(path: str | os.PathLike) -> list[CanaryRecord]:
    """Read a JSONL file of records (blank lines skipped; extra keys ignored)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"records file {path} is a folder; expected a JSONL file")
    if not path.is_file():
        raise ValueError(f"records file not found: {path}")
    records: list[CanaryRecord] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:  # bytes, so that a non-UTF-8 line is reported with its number
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            record = record_from_dict(obj, where)
            if record.id in seen:
                raise ValueError(f"{where}: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(record)
    return records


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temp file in the same folder + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_records(records: Iterable[CanaryRecord], path: str | os.PathLike) -> None:
    """Write records as JSONL (atomically)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------
# Low-level model plumbing (HF causal LM interface, transformers 4.x and 5.x)
# --------------------------------------------------------------------------------------

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, seq, head_dim]


@functools.lru_cache(maxsize=None)
def _cache_arg_for(model_type: type) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_arg(model: torch.nn.Module) -> str:
    return _cache_arg_for(type(model))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _lm_forward(
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


def _cache_to_kv(cache: Any) -> KV:
    """Extract per-layer (K, V) tensors from a DynamicCache (5.x or 4.x) or a legacy tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


def _kv_to_cache(kv: KV) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(kv):
        cache.update(k, v, layer_idx)
    return cache


def _kv_concat(prefix: KV, suffix: KV | None, batch: int) -> KV:
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


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Same call the fine-tuning uses (special tokens as the tokenizer adds them, e.g. BOS).
    return list(tokenizer(text)["input_ids"])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _split_continuations(
    tokenizer: Any, prefix: str, candidates: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """Tokenize prefix+candidate jointly; return (shared context ids, continuation ids per candidate).

    The shared context is the longest token prefix common to ``tokenize(prefix)`` and every
    ``tokenize(prefix + candidate)``. Normally that is all of ``tokenize(prefix)``; when the
    tokenizer merges across the boundary (e.g. "key " + "a1" -> "key", " a", "1") it is shorter
    and the continuation includes the merged token. Either way a candidate's score is
    log p(tokenize(prefix + candidate)) - log p(shared), so scores stay comparable.
    """
    prefix_ids = _encode(tokenizer, prefix)
    joint = [_encode(tokenizer, prefix + c) for c in candidates]
    shared_len = len(prefix_ids)
    for ids in joint:
        shared_len = min(shared_len, _common_prefix_len(prefix_ids, ids))
    if shared_len == 0:
        raise ValueError(
            f"prefix {prefix!r} shares no token with its continuations; add a BOS token or a longer prefix"
        )
    return prefix_ids[:shared_len], [ids[shared_len:] for ids in joint]


@dataclass
class _Context:
    """A shared context run once: its KV cache (batch 1) and next-token log-probs [V]."""

    kv: KV
    next_logprobs: torch.Tensor


@torch.inference_mode()
def _run_context(model: torch.nn.Module, ids: Sequence[int]) -> _Context:
    input_ids = torch.tensor([list(ids)], device=_device(model))
    logits, cache = _lm_forward(model, input_ids)
    return _Context(_cache_to_kv(cache), torch.log_softmax(logits[0, -1].float(), dim=-1))


@torch.inference_mode()
def _score_continuations(
    model: torch.nn.Module, ctx: _Context, continuations: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """Sum of log p(continuation tokens | context), float64 [n] (0 for an empty continuation)."""
    device = _device(model)
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
            cache = _kv_to_cache(_kv_concat(ctx.kv, None, len(chunk)))
            logits, _ = _lm_forward(model, ids[:, :-1], cache)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, ids[:, 1:, None])[..., 0].double().cpu()  # [B, width-1]
            valid = torch.arange(1, width)[None, :] < lengths[:, None]
            total = total + (picked * valid).sum(dim=1)
        scores[start : start + len(chunk)] = total
    return scores


def secret_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    prefix: str,
    candidates: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """log p(candidate | prefix) in nats for each candidate: float64 tensor [n] on CPU.

    The shared prefix runs once; its KV cache is broadcast over each batch of candidates.
    Prefix and candidate are tokenized jointly; when the tokenizer merges across the boundary
    the score is log p(tokens after the part all candidates share), comparable across them.
    Full-attention decoders (Llama / SmolLM2 / Qwen2 / GPT-2 style DynamicCache).
    """
    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.float64)
    shared, continuations = _split_continuations(tokenizer, prefix, candidates)
    ctx = _run_context(model, shared)
    return _score_continuations(model, ctx, continuations, batch_size)


# --------------------------------------------------------------------------------------
# Exposure
# --------------------------------------------------------------------------------------


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
        shared, conts = _split_continuations(tokenizer, prefix, probes)
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
def _trie_root(model: torch.nn.Module, plan: _DigitPlan) -> tuple[_Context, _Frontier]:
    ctx = _run_context(model, plan.shared)
    digit_ids = torch.tensor(plan.digit_ids)
    if plan.boundary:
        ids = torch.tensor([plan.boundary], device=_device(model))
        logits, cache = _lm_forward(model, ids, _kv_to_cache(_kv_concat(ctx.kv, None, 1)))
        next_lp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        shared_len = len(plan.shared)
        suffix = [(k[:, :, shared_len:], v[:, :, shared_len:]) for k, v in _cache_to_kv(cache)]
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
    ctx: _Context,
    frontier: _Frontier,
    parent: torch.Tensor,
    char: torch.Tensor,
    weight: torch.Tensor,
    digit_ids: torch.Tensor,
    batch_size: int,
) -> _Frontier:
    """Run one token (the chosen child character) for each (parent, char) pair, with the
    parent's cached suffix: every node costs a single-token forward."""
    device = _device(model)
    next_lps, suffix_parts = [], []
    for start in range(0, len(parent), batch_size):
        rows = parent[start : start + batch_size]
        suffix = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in frontier.suffix]
        cache = _kv_to_cache(_kv_concat(ctx.kv, suffix, len(rows)))
        ids = digit_ids[char[start : start + batch_size]][:, None].to(device)
        logits, new_cache = _lm_forward(model, ids, cache)
        lp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        next_lps.append(lp[:, digit_ids.to(lp.device)].double().cpu())
        shared_len = ctx.kv[0][0].shape[2]
        suffix_parts.append([(k[:, :, shared_len:], v[:, :, shared_len:]) for k, v in _cache_to_kv(new_cache)])
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
    model: torch.nn.Module, ctx: _Context, root: _Frontier, plan: _DigitPlan, secret_idx: list[int]
) -> float:
    """log p(secret characters | prefix, boundary): the same quantity the trie sums."""
    digit_ids = torch.tensor(plan.digit_ids)
    total = float(root.next_logprobs[0, secret_idx[0]])
    if len(secret_idx) > 1:
        ids = digit_ids[torch.tensor(secret_idx[:-1])][None, :].to(_device(model))
        cache = _kv_to_cache(_kv_concat(ctx.kv, root.suffix, 1))
        logits, _ = _lm_forward(model, ids, cache)
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
    n_samples: int = 1000,
    frontier_cap: int = 256,
    enumerate_limit: int = 2048,
    sampled_rank_max_space: int = 10**6,
    batch_size: int = 64,
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


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


@dataclass
class ExtractionResult:
    """Greedy continuation of a record's prefix; ``extracted`` iff it starts with the secret."""

    id: str
    extracted: bool
    continuation: str


def _secret_token_count(tokenizer: Any, record: CanaryRecord) -> int:
    _, (cont,) = _split_continuations(tokenizer, record.prefix, [record.secret])
    return len(cont)


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
    ids, mask, positions = left_padded(prompts, pad_id, _device(model))
    logits, cache = _lm_forward(model, ids, None, mask, positions)
    generated = []
    for step in range(n_new):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        generated.append(nxt)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _lm_forward(model, nxt, cache, mask, positions)
    return torch.cat(generated, dim=1).cpu().tolist()


def extract_secrets(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    extra_tokens: int = 3,
    batch_size: int = 16,
) -> list[ExtractionResult]:
    """Greedy-decode len(secret tokens) + ``extra_tokens`` tokens from each record's prefix.

    Records are batched with left padding (attention mask + explicit position ids), so a
    batched result equals decoding each prompt alone up to float noise.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[ExtractionResult] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [_encode(tokenizer, r.prefix) for r in chunk]
        n_new = [_secret_token_count(tokenizer, r) + extra_tokens for r in chunk]
        new_ids = _greedy_batch(model, prompts, max(n_new), pad_id)
        for record, ids, n in zip(chunk, new_ids, n_new):
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            results.append(ExtractionResult(record.id, _is_extracted(text, record.secret), text))
    return results


# --------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16
) -> list[torch.Tensor]:
    """Per text: log p(token_t | tokens_<t) for t = 1..T-1, float64 [T-1] on CPU (nats)."""
    device = _device(model)
    encoded = [_encode(tokenizer, t) for t in texts]
    out: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        # Right padding: causal attention keeps real tokens from seeing the pads.
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        logits, _ = _lm_forward(model, ids, use_cache=False)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out.extend(lp[row, : len(seq) - 1].double().cpu() for row, seq in enumerate(chunk))
    return out


def min_k_prob(logprobs: torch.Tensor, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest max(1, floor(k * T)) token log-probs (nats)."""
    n = max(1, int(len(logprobs) * k))
    return float(torch.sort(logprobs).values[:n].mean())


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


@dataclass
class MIAScores:
    """Per-record raw statistics (arrays of shape [n]) and member scores (higher = member)."""

    loss: np.ndarray  # mean token NLL, nats/token
    nll_sum: np.ndarray  # summed token NLL, nats
    zlib_ratio: np.ndarray  # nll_sum / zlib-compressed length in bytes
    min_k: np.ndarray  # mean of the lowest k% token log-probs, nats

    def member_scores(self) -> dict[str, np.ndarray]:
        """Scores oriented so that higher means "more likely a member"."""
        return {"loss": -self.loss, "zlib": -self.zlib_ratio, "min_k": self.min_k}


def mia_scores(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], k: float = 0.2, batch_size: int = 16
) -> MIAScores:
    """Loss, zlib ratio and Min-K% Prob of each text (need >= 2 tokens per text)."""
    lps = token_logprobs(model, tokenizer, texts, batch_size)
    for text, lp in zip(texts, lps):
        if len(lp) == 0:
            raise ValueError(f"text {text!r} has fewer than 2 tokens; cannot score membership")
    nll_sum = np.array([-float(lp.sum()) for lp in lps])
    loss = np.array([-float(lp.mean()) for lp in lps])
    zlib_ratio = nll_sum / np.array([zlib_entropy(t) for t in texts], dtype=np.float64)
    mink = np.array([min_k_prob(lp, k) for lp in lps])
    return MIAScores(loss=loss, nll_sum=nll_sum, zlib_ratio=zlib_ratio, min_k=mink)


@dataclass
class MIAMetrics:
    """ROC summary of a membership score (members labelled 1)."""

    auc: float
    tpr_at_1pct_fpr: float
    fpr: list[float] = field(repr=False)
    tpr: list[float] = field(repr=False)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float = 0.01) -> float:
    """TPR of the ROC polyline at FPR = target (linear interpolation between ROC points,
    the TPR reachable by randomising between two thresholds). Where the curve is vertical
    at ``target`` the top of the segment is taken."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    at = fpr == target
    if at.any():
        return float(tpr[at].max())
    right = int(np.searchsorted(fpr, target, side="right"))  # first point with fpr > target
    if right == 0:
        return float(tpr[0])
    if right >= len(fpr):
        return float(tpr[-1])
    left = right - 1  # last point with fpr < target: the top of its vertical run
    x0, y0, x1, y1 = fpr[left], tpr[left], fpr[right], tpr[right]
    return float(y0 + (y1 - y0) * (target - x0) / (x1 - x0))


def mia_metrics(
    member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr_target: float = 0.01
) -> MIAMetrics:
    """AUC and TPR at ``fpr_target`` of a score where higher means "member".

    With fewer than 1/fpr_target non-members the 1 % point falls inside the first ROC step and
    is interpolated: read it as coarse.
    """
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)]
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return MIAMetrics(
        auc=float(roc_auc_score(y, s)),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, fpr_target),
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
    )


def auc_confidence_interval(auc: float, n_members: int, n_nonmembers: int, level: float = 0.95) -> tuple[float, float]:
    """Hanley-McNeil (1982) normal-approximation interval for an ROC AUC, clipped to [0, 1].

    Needs only the AUC and the two sample sizes, so it can be put on any reported AUC; at
    AUC = 0.5 its variance is the Mann-Whitney null variance (n1 + n2 + 1) / (12 n1 n2).
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"an AUC interval needs at least one member and one non-member, got {n_members} and {n_nonmembers}")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc**2) + (n_nonmembers - 1) * (q2 - auc**2)) / (n_members * n_nonmembers)
    half = float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def paired_auc_difference(
    members_a: Sequence[float], nonmembers_a: Sequence[float],
    members_b: Sequence[float], nonmembers_b: Sequence[float],
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) for two models scored on the SAME records, with a stratified paired
    bootstrap interval (members and non-members resampled separately, the same draw for both
    models): (difference, low, high). Index i of a and b must be the same record."""
    m_a, m_b = np.asarray(members_a, dtype=np.float64), np.asarray(members_b, dtype=np.float64)
    n_a, n_b = np.asarray(nonmembers_a, dtype=np.float64), np.asarray(nonmembers_b, dtype=np.float64)
    if m_a.shape != m_b.shape or n_a.shape != n_b.shape:
        raise ValueError(f"paired AUCs need the same records for both models: members {m_a.shape} vs {m_b.shape}, "
                         f"non-members {n_a.shape} vs {n_b.shape}")
    if m_a.size == 0 or n_a.size == 0:
        raise ValueError("membership inference needs at least one member and one non-member")

    def auc(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
        # Mann-Whitney over the last axis, ties half: [B, M] x [B, N] -> [B]
        diff = members[..., :, None] - nonmembers[..., None, :]
        return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))

    rng = np.random.default_rng(seed)
    im = rng.integers(0, m_a.size, size=(n_boot, m_a.size))
    inn = rng.integers(0, n_a.size, size=(n_boot, n_a.size))
    boot = auc(m_a[im], n_a[inn]) - auc(m_b[im], n_b[inn])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(auc(m_a, n_a) - auc(m_b, n_b)), float(lo), float(hi)


# --------------------------------------------------------------------------------------
# Forget quality
# --------------------------------------------------------------------------------------


@dataclass
class KSResult:
    """Two-sample Kolmogorov-Smirnov test; p > 0.05 reads as "indistinguishable" (TOFU)."""

    statistic: float
    pvalue: float


def forget_quality(losses: Sequence[float], reference_losses: Sequence[float]) -> KSResult:
    """KS test between a model's and the retrain reference's per-record losses (nats/token)."""
    result = stats.ks_2samp(np.asarray(losses, dtype=np.float64), np.asarray(reference_losses, dtype=np.float64))
    return KSResult(statistic=float(result.statistic), pvalue=float(result.pvalue))


# --------------------------------------------------------------------------------------
# White-box check
# --------------------------------------------------------------------------------------


def canary_gradient_norm(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int = 16
) -> float:
    """‖∂L/∂W‖_F over every linear layer of the decoder blocks, at the weights the model uses now.

    L is the mean over records of the mean NLL (nats) of the secret's tokens given the prefix.
    W is the effective weight of each layer (W_base + alpha·W_ortho for a libortho layer, at the
    model's current alpha): a zero perturbation D [out, in] is added to every layer's output as
    x·Dᵀ and ∂L/∂D is read off. A model that memorised the secrets sits near a minimum of L (small
    gradient); one that never saw them does not.
    """
    from .calibrate import decoder_blocks
    from .layer import OrthoLinear

    _, blocks = decoder_blocks(model)
    layers = [m for block in blocks for m in block.modules() if isinstance(m, (torch.nn.Linear, OrthoLinear))]
    device = _device(model)
    probes = [torch.zeros(m.out_features, m.in_features, device=device, requires_grad=True) for m in layers]

    def perturb(D: torch.Tensor):
        return lambda module, args, output: output + args[0].to(D.dtype) @ D.t()

    handles = [m.register_forward_hook(perturb(D)) for m, D in zip(layers, probes)]
    try:
        with torch.enable_grad():
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                encoded = [_encode(tokenizer, r.prefix + r.secret) for r in chunk]
                width = max(len(ids) for ids in encoded)
                # Right padding: causal attention keeps real tokens from seeing the pads.
                x = torch.zeros(len(chunk), width, dtype=torch.long)
                secret = torch.zeros(len(chunk), width - 1)  # 1 where position t predicts a secret token
                for row, (r, ids) in enumerate(zip(chunk, encoded)):
                    x[row, : len(ids)] = torch.tensor(ids)
                    begin = max(1, _common_prefix_len(_encode(tokenizer, r.prefix), ids))
                    secret[row, begin - 1 : len(ids) - 1] = 1.0 / max(len(ids) - begin, 1)
                x, secret = x.to(device), secret.to(device)
                logits, _ = _lm_forward(model, x, use_cache=False)
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
                (-(lp * secret).sum() / len(records)).backward()
    finally:
        for h in handles:
            h.remove()
    return float(torch.sqrt(sum(D.grad.double().square().sum() for D in probes if D.grad is not None)))
