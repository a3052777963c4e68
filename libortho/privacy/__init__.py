"""Privacy attacks and metrics on a Hugging Face causal LM.

Everything here is a pure function of (model, tokenizer, records): nothing changes the
model (no alpha switching, no mode changes; callers put the model in ``eval()``).

* Canary records and their secret formats: :mod:`libortho.records` (re-exported here).
* Scoring and exposure (:mod:`.exposure`): :func:`secret_logprobs` = log p(candidate | prefix),
  prefix run once, KV cache reused; :func:`exposure` (Carlini et al. 2019, "The Secret Sharer"),
  with an exact branch-and-bound rank over the digit trie, plus sampled and skew-normal estimates.
* Extraction (:mod:`.extraction`): :func:`extract_secrets`, greedy decoding from each record's
  own prefix.
* Membership inference (:mod:`.membership`): :func:`mia_scores` (loss, zlib ratio, Min-K% Prob)
  and :func:`mia_metrics` (ROC AUC, TPR at 1 % FPR).
* Forget quality (:mod:`.forgetting`): :func:`forget_quality`, a two-sample KS test against a
  retrain reference.
* White-box check (:mod:`.whitebox`): :func:`canary_gradient_norm`.
* Attacks with the public model and by sampling: :mod:`.attacks`.

Units: log-probabilities and losses are in nats, exposure in bits.
"""

from __future__ import annotations

from ..records import (
    ALPHABETS,
    CanaryRecord,
    SecretFormat,
    atomic_write_text,
    candidate_space_size,
    load_records,
    parse_format,
    record_from_dict,
    sample_candidates,
    save_records,
)
from .exposure import ExposureResult, exposure, exposure_from_scores, secret_logprobs
from .extraction import ExtractionResult, extract_secrets, left_padded
from .forgetting import KSResult, forget_quality
from .membership import (
    MIAMetrics,
    MIAScores,
    auc_confidence_interval,
    mia_metrics,
    mia_scores,
    min_k_prob,
    paired_auc_difference,
    token_logprobs,
    tpr_at_fpr,
    zlib_entropy,
)
from .whitebox import canary_gradient_norm

# Private names that other modules and tests reach through ``libortho.privacy``; kept here so
# that those paths keep working after the split into submodules.
from ..records import _as_rng  # noqa: F401
from ._lm import (  # noqa: F401
    _cache_to_kv,
    _common_prefix_len,
    _device,
    _encode,
    _kv_to_cache,
    _lm_forward,
    _split_continuations,
)
from .exposure import _digit_plan, _enumerate_all  # noqa: F401
from .extraction import _is_extracted, _secret_token_count  # noqa: F401

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
