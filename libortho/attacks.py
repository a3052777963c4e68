"""Compatibility path: the attacks with the public model and by sampling live in
:mod:`libortho.privacy.attacks`; this module re-exports them for one release."""

from .privacy.attacks import (  # noqa: F401
    REFERENCE_SCORE,
    SampledExtractionResult,
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
