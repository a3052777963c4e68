"""Compatibility path: reference-calibrated membership inference lives in
:mod:`libortho.privacy.membership` and extraction by sampling in :mod:`libortho.privacy.extraction`;
this module re-exports them for one release."""

from .privacy.attacks import (  # noqa: F401
    REFERENCE_SCORE,
    SampledExtractionResult,
    Sampling,
    __all__,
    _record_generator,
    _sample_batch,
    _sample_tokens,
    public_losses_for,
    record_losses,
    reference_calibrated_scores,
    sample_extract_secrets,
    tpr_at_lowest_fpr,
)
