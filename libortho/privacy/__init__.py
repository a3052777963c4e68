"""Privacy attacks and metrics on a Hugging Face causal LM.

Everything here is a pure function of (model, tokenizer, records): nothing changes the
model (no alpha switching, no mode changes; callers put the model in ``eval()``).

* Canary records and their secret formats: :mod:`libortho.records` (re-exported here).
* Scoring and exposure (:mod:`.exposure_rank`): :func:`secret_logprobs` = log p(candidate | prefix),
  prefix run once, KV cache reused; :func:`exposure` (Carlini et al. 2019, "The Secret Sharer"),
  with an exact branch-and-bound rank over the digit trie, plus sampled and skew-normal estimates.
* Extraction (:mod:`.extraction`): :func:`extract_secrets`, greedy decoding from each record's
  own prefix, and :func:`sample_extract_secrets`, many samples per prefix (:class:`Sampling`).
* Membership inference (:mod:`.membership`): :func:`mia_scores` (loss, zlib ratio, Min-K% Prob),
  :func:`mia_metrics` (ROC AUC, TPR at 1 % FPR), and the public-model-calibrated score
  (:func:`record_losses`, :func:`reference_calibrated_scores`, :func:`tpr_at_lowest_fpr`).
* Forget quality (:mod:`.forgetting`): :func:`forget_quality`, a two-sample KS test against a
  retrain reference.
* White-box check (:mod:`.whitebox`): :func:`canary_gradient_norm`.
* How the attacks run the model (:mod:`.forward`): one forward pass with or without a KV cache,
  and the split of prefix + candidate into shared context and continuations.

Units: log-probabilities and losses are in nats, exposure in bits.
"""

from __future__ import annotations

from .. import records
from . import exposure_rank, extraction, forgetting, membership, whitebox
from ..records import (  # noqa: F401 (re-exported)
    ALPHABETS,
    CanaryRecord,
    SecretFormat,
    atomic_write_text,
    candidate_space_size,
    load_records,
    parse_format,
    record_from_dict,
    record_rng,
    record_seed,
    sample_candidates,
    save_records,
)
from .exposure_rank import ExposureResult, exposure, exposure_from_scores, secret_logprobs  # noqa: F401 (re-exported)
from .extraction import (  # noqa: F401 (re-exported)
    ExtractionResult,
    SampledExtractionResult,
    Sampling,
    extract_secrets,
    left_padded,
    sample_extract_secrets,
)
from .forgetting import KSResult, forget_quality  # noqa: F401 (re-exported)
from .membership import (  # noqa: F401 (re-exported)
    MIAMetrics,
    MIAScores,
    REFERENCE_SCORE,
    auc_confidence_interval,
    mia_metrics,
    mia_scores,
    min_k_prob,
    paired_auc_difference,
    public_losses_for,
    record_losses,
    reference_calibrated_scores,
    token_logprobs,
    tpr_at_fpr,
    tpr_at_lowest_fpr,
    zlib_entropy,
)
from .whitebox import canary_gradient_norm  # noqa: F401 (re-exported)

__all__ = [
    *records.__all__, *exposure_rank.__all__, *extraction.__all__, *membership.__all__, *forgetting.__all__,
    *whitebox.__all__,
]
