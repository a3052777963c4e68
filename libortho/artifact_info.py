"""What `libortho info` reports of an artifact: settings, sizes of the base and of each ortho part,
densities, bits per parameter and the status of every file, read from the manifest and the files
(the private ortho file stat-ed, not opened, unless asked to verify it)."""
from __future__ import annotations

from pathlib import Path

from . import artifact
from .lowrank import rank_bytes
from .ortho_split import sparse_bytes


def artifact_info(path: str | Path, verify_ortho: bool = False) -> dict:
    """Settings, sizes and densities of an artifact, from its manifest and files, after checking
    every file against its SHA-256 (raises ArtifactError). The ortho file is only stat-ed unless
    `verify_ortho`, which also hashes it and checks its CSR structure."""
    manifest = artifact.read_manifest(path)
    verified = artifact.verify_artifact(path, verify_ortho=verify_ortho)
    layers = manifest["layers"]
    n_weights = sum(s["in_features"] * s["out_features"] for s in layers.values())
    n_ortho = sum(s["ortho_nnz"] for s in layers.values())
    base_bits = sum(
        s["in_features"] * s["out_features"] * s["bits"]
        + s["out_features"] * -(-s["in_features"] // s["group_size"]) * 32  # fp16 scale + fp16 zero
        for s in layers.values()
    )
    sparse_bits = 8 * sum(sparse_bytes(s["ortho_nnz"], s["out_features"]) for s in layers.values())
    lowrank_bits = 8 * sum(s["ortho_rank"] * rank_bytes(s["out_features"], s["in_features"], s.get("lowrank_bits", 16))
                           for s in layers.values())
    ortho_bits = sparse_bits + lowrank_bits
    cfg = manifest.get("config") or {}
    files = {
        name: dict(sha256=sha, bytes=(Path(path) / name).stat().st_size if (Path(path) / name).exists() else None,
                   status=verified[name])
        for name, sha in manifest["files"].items()
    }
    return dict(
        path=str(path), bits=cfg.get("bits"), group_size=cfg.get("group_size"), symmetric=cfg.get("symmetric"),
        method=cfg.get("method"), score=cfg.get("score"), budget=cfg.get("budget"),
        ortho_ratio_requested=cfg.get("ortho_ratio"), n_layers=len(layers), n_weights=n_weights,
        n_ortho=n_ortho, ortho_density=n_ortho / max(n_weights, 1),
        bits_per_param_base=base_bits / max(n_weights, 1),
        bits_per_param_alpha1=(base_bits + ortho_bits) / max(n_weights, 1),
        base_bytes=base_bits // 8, sparse_bytes=sparse_bits // 8, lowrank_bytes=lowrank_bits // 8,
        lowrank_ranks=sorted({s["ortho_rank"] for s in layers.values()}),
        lowrank_bits=sorted({s.get("lowrank_bits", 16) for s in layers.values() if s["ortho_rank"] > 0}),
        base_only=manifest["ortho"] is None, ortho_base_sha256=(manifest["ortho"] or {}).get("base_sha256"),
        files=files, provenance=manifest.get("provenance"), stats=manifest.get("stats"),
    )
