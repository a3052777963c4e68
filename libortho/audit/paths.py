"""The audit from files on disk (for the CLI): records, public text and models loaded, checked first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..records import load_records
from .config import AlphaSpec, AuditConfig, parse_alphas
from .measure import public_record_losses
from .run import audit

__all__ = ["audit_from_paths", "load_any_model", "ModelLoader"]

ModelLoader = Callable[[str], tuple[torch.nn.Module, Any]]


def load_any_model(path: str, with_ortho: bool | None = None) -> tuple[torch.nn.Module, Any]:
    """A libortho artifact (``libortho.load``; its ortho stream when `with_ortho`, or by default
    when present and readable) or a plain local HF folder / .gguf file (``libortho.load_model``).
    Raises ``ArtifactError`` (a ``ValueError``) with the reason when it cannot be loaded."""
    from libortho import artifact
    from libortho import sources

    if artifact.is_artifact(path):
        return artifact.load(path, with_ortho=with_ortho)
    return sources.load_model(path)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} not found: {p}")
    return p


def audit_from_paths(
    model_path: str | os.PathLike,
    members_path: str | os.PathLike,
    nonmembers_path: str | os.PathLike,
    public_text_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    alphas: str | Sequence[AlphaSpec] | None = None,
    reference_path: str | os.PathLike | None = None,
    public_model_path: str | os.PathLike | None = None,
    load_model: ModelLoader | None = None,
    **audit_kwargs: Any,
) -> dict[str, Any]:
    """Load everything from disk, run :func:`audit`, write the report into ``out_dir``.

    ``members_path`` / ``nonmembers_path``: JSONL canary records; ``public_text_path``: UTF-8
    held-out public text; ``alphas``: e.g. ``"0,0.25,0.5,0.75,1"`` or ``None`` (model as is);
    ``load_model(path) -> (model, tokenizer)`` defaults to :func:`load_any_model`.
    ``public_model_path``: the public checkpoint P, for the P-calibrated membership attack; it is
    loaded first, scored on every record once, and freed before the audited model is loaded.
    Bad inputs raise ``ValueError`` naming the file (and line, for records).
    """
    parsed_alphas = parse_alphas(alphas)
    members = load_records(_require_file(members_path, "members file"))
    nonmembers = load_records(_require_file(nonmembers_path, "non-members file"))
    if not members:
        raise ValueError(f"members file has no records: {members_path}")
    if not nonmembers:
        raise ValueError(f"non-members file has no records: {nonmembers_path}")
    text_file = _require_file(public_text_path, "public text file")
    try:
        public_text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"public text file is not UTF-8: {text_file} ({exc})") from None
    if not public_text.strip():
        raise ValueError(f"public text file is empty: {text_file}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a folder: {out}")
    for path, what in ((model_path, "model"), (reference_path, "reference model"), (public_model_path, "public model")):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{what} not found: {path}")

    # An audit at alpha 0 only never opens the artifact's ortho file.
    needs_ortho = any(a is not None and a > 0 for a in (parsed_alphas or []))
    loader = load_model or (lambda p: load_any_model(p, with_ortho=needs_ortho))
    if public_model_path is not None and audit_kwargs.get("public_losses") is None:
        public, public_tok = loader(str(public_model_path))
        audit_kwargs["public_losses"] = public_record_losses(
            public, public_tok, members, nonmembers, audit_kwargs.get("text_batch_size", AuditConfig.text_batch_size))
        del public, public_tok
        import gc

        gc.collect()
    model, tokenizer = loader(str(model_path))
    reference, reference_tokenizer = (None, None)
    if reference_path is not None:
        reference, reference_tokenizer = loader(str(reference_path))
    return audit(
        model, tokenizer, public_text, members, nonmembers,
        alphas=parsed_alphas, reference=reference, out_dir=out,
        reference_tokenizer=reference_tokenizer, **audit_kwargs,
    )
