"""Compatibility path: the attacks that use the public model moved to :mod:`.membership`
(reference-calibrated membership inference) and extraction by sampling to :mod:`.extraction`;
this module re-exports them for one release."""

from .extraction import (  # noqa: F401
    SampledExtractionResult,
    Sampling,
    _record_generator,
    _sample_batch,
    _sample_tokens,
    sample_extract_secrets,
)
from .membership import (  # noqa: F401
    REFERENCE_SCORE,
    public_losses_for,
    record_losses,
    reference_calibrated_scores,
    tpr_at_lowest_fpr,
)

__all__ = [
    "REFERENCE_SCORE",
    "record_losses",
    "reference_calibrated_scores",
    "tpr_at_lowest_fpr",
    "Sampling",
    "SampledExtractionResult",
    "sample_extract_secrets",
]
