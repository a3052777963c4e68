"""The audit report's vocabulary: membership score names, record groups, exposure methods."""

from __future__ import annotations

from typing import Any, Sequence

from ..privacy.membership import REFERENCE_SCORE  # loss minus the public model's loss, when P is given
from ..records import CanaryRecord

__all__ = [
    "MIA_SCORES", "REFERENCE_SCORE", "NONMEMBER_GROUP", "MEASURED_METHODS", "EXTRAPOLATED_METHODS", "SCORE_LABELS",
]

MIA_SCORES = ("loss", "zlib", "min_k")
NONMEMBER_GROUP = "nonmember"
MEASURED_METHODS = ("exact", "trie-sampled", "enumeration", "sampled-rank")  # ranks observed
EXTRAPOLATED_METHODS = ("skewnorm",)  # ranks fitted beyond what the candidates resolve
SCORE_LABELS = {"loss": "loss", "zlib": "zlib", "min_k": "Min-K%", REFERENCE_SCORE: "P-calibrated loss"}


def _group(record: CanaryRecord, member: bool) -> str:
    return str(record.k) if member else NONMEMBER_GROUP


def _sorted_groups(groups: Sequence[str]) -> list[str]:
    return sorted(groups, key=lambda g: (g == NONMEMBER_GROUP, int(g) if g.isdigit() else 0))


def _group_name(group: str) -> str:
    return "non-members" if group == NONMEMBER_GROUP else f"k={group}"


def _score_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """MIA scores present in every row, in report order (loss, zlib, min_k[, ref])."""
    names = [n for n in (*MIA_SCORES, REFERENCE_SCORE) if all(n in r["mia"] for r in rows)]
    return names
