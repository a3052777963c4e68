"""libortho: a privacy switch for fine-tuned LLMs.

Every linear layer becomes Y = W_base·X + alpha·W_ortho·X: a dense INT base stream plus a
sparse high-precision ortho stream, with alpha an explicit runtime switch.

    import libortho
    stats = libortho.decompose(model, tokenizer, public_text, libortho.OrthoConfig())
    libortho.save(model, tokenizer, "out/")
    model, tok = libortho.load("out/", alpha=0.0)
    with libortho.alpha(model, 1.0):
        model.generate(...)
"""
__version__ = "0.1.0"  # before the imports below: decompose records it

from .config import OrthoConfig, preset
from .decompose import DecompositionStats, decompose
from .evaluation import perplexity
from .layer import OrthoLinear
from .switch import alpha, get_alpha, set_alpha
from .artifact import load, save
from .artifact_format import ArtifactError
from .sources import load_model


__all__ = [
    "ArtifactError",
    "DecompositionStats",
    "OrthoConfig",
    "OrthoLinear",
    "alpha",
    "decompose",
    "get_alpha",
    "load",
    "load_model",
    "perplexity",
    "preset",
    "save",
    "set_alpha",
]
