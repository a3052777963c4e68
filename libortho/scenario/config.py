"""What determines a scenario: :class:`ScenarioConfig`, its presets and its cache key."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..records import parse_format
from .corpus import CORPORA, DEFAULT_CORPUS, corpus_fingerprint
from .templates import DEFAULT_FAMILY, template_family

SCENARIO_VERSION = 1  # bump when anything that changes the produced artifacts changes
# Fields added after scenarios were first cached: they enter the cache key only when set away from
# their default, so that every scenario cached before they existed keeps its key (and its folder).
_KEYED_ONLY_WHEN_SET = ("templates", "corpus")

@dataclass
class ScenarioConfig:
    """Everything that determines a scenario (its cache key is a hash of these fields).

    ``n_per_k``: member records per (k, secret format); ``n_nonmembers``: non-member records
    per format (None = as many as members of that format). ``train_blocks``: the decoder
    blocks whose linear weights train: None = all, an int n = the last n blocks (all if the
    model has fewer), a tuple = block indices (negative = from the end).
    ``model``: the public model P (HF folder or .gguf; None = the built-in default).
    ``templates``: the record template family (scenario.templates: ``default``, ``prose``,
    ``code``); ``corpus``: the public text (scenario.corpus: ``pydoc``, ``stdlib``).
    Learning rate: linear warm-up over ``warmup_steps``, then cosine decay to
    ``lr * min_lr_ratio`` at the last step; gradients clipped to ``grad_clip``.
    """

    preset: str = "default"
    seed: int = 0
    n_per_k: int = 8
    ks: tuple[int, ...] = (1, 4, 16)
    formats: tuple[str, ...] = ("digits:6", "hex:8")
    n_nonmembers: int | None = None
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 192
    batch: int = 1
    train_blocks: int | tuple[int, ...] | None = None
    model: str | None = None
    templates: str = DEFAULT_FAMILY
    corpus: str = DEFAULT_CORPUS

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        self.formats = tuple(self.formats)
        if isinstance(self.train_blocks, (list, tuple)):
            self.train_blocks = tuple(int(b) for b in self.train_blocks)
        elif self.train_blocks is not None:
            if isinstance(self.train_blocks, bool) or int(self.train_blocks) < 1:
                raise ValueError(f"train_blocks as an int must be >= 1, got {self.train_blocks!r}")
            self.train_blocks = int(self.train_blocks)
        if self.model is not None:
            self.model = str(self.model)
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must be distinct positive integers, got {self.ks}")
        for fmt in self.formats:
            parse_format(fmt)
        template_family(self.templates)
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown public corpus {self.corpus!r}; expected one of {', '.join(CORPORA)}")
        if self.n_per_k < 1 or self.steps < 1 or self.seq_len < 2 or self.batch < 1:
            raise ValueError("n_per_k, steps, batch must be >= 1 and seq_len >= 2")
        if self.n_nonmembers is not None and self.n_nonmembers < 0:
            raise ValueError("n_nonmembers must be >= 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be in [0, steps]")

    @classmethod
    def default(cls, **overrides: Any) -> "ScenarioConfig":
        """The default scenario on SmolLM2-135M: 16 member records per k (8 PIN, 8 hex key),
        48 non-members, 100 AdamW steps of one 192-token public window (19,200 public tokens) plus
        336 record insertions (~7,700 tokens), lr 2e-4, all 30 blocks.

        Measured (seed 0, 1 CPU thread on a loaded 2-core machine): fine-tune 330 s, reference 235 s;
        held-out perplexity P 17.1 -> fine-tuned 11.9 (reference 11.8); greedy extraction k=16:
        14/16, k=4: 0/16, k=1: 0/16; exposure vs 100 random candidates (max 6.7 bits) k=16: 6.7,
        k=4: 5.7-6.5, k=1: 2.2-2.7, non-members and reference: 0.7-1.8.
        """
        return cls(**{"preset": "default", **overrides})

    @classmethod
    def demo(cls, **overrides: Any) -> "ScenarioConfig":
        """The demo's scenario, cut to fit the demo in 20 minutes on 2 CPU cores: the default's PIN
        records only (8 per k, 24 non-members; the hex keys, whose exposure is only ever
        extrapolated, stay in the default) on a shorter fine-tune, 40 steps of one 128-token public
        window (5,120 public tokens), lr 3e-4. Measured over scenario seeds: docs/RESULTS.md.
        """
        base = dict(preset="demo", formats=("digits:6",), steps=40, seq_len=128, lr=3e-4, warmup_steps=4)
        return cls(**{**base, **overrides})

    @classmethod
    def quick(cls, **overrides: Any) -> "ScenarioConfig":
        """A tiny scenario for smoke tests and the quick demo: builds in well under a minute on CPU.

        Few steps on short windows and one record per (k, format); only the last 4 blocks train
        (the backward stops there). Memorisation is weak: it exercises the pipeline, not the claim.
        """
        base = dict(
            preset="quick", n_per_k=1, steps=8, lr=1e-3, warmup_steps=1, seq_len=64, batch=1,
            train_blocks=4,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def heldout(cls, **overrides: Any) -> "ScenarioConfig":
        """A held-out shape: the default fine-tune on other public text (standard-library
        docstrings) with records of another template family (support tickets in prose), 6-digit
        account numbers inserted 4 and 16 times; 32 members per k and 200 non-members, enough to
        resolve 1 bit of exposure and FPR 0.5 %, as in the evaluation scenario.
        """
        base = dict(
            preset="heldout", templates="prose", corpus="stdlib", formats=("digits:6",), ks=(4, 16),
            n_per_k=32, n_nonmembers=200,
        )
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        d["formats"] = list(self.formats)
        if isinstance(self.train_blocks, tuple):
            d["train_blocks"] = list(self.train_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScenarioConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ScenarioConfig field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("ks", "formats"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("train_blocks"), list):
            d["train_blocks"] = tuple(d["train_blocks"])
        return cls(**d)

    def members_per_format(self) -> int:
        return self.n_per_k * len(self.ks)

    def nonmembers_per_format(self) -> int:
        return self.members_per_format() if self.n_nonmembers is None else self.n_nonmembers

    def cache_key(self) -> str:
        """Hash of the config, the scenario code version, the corpus and the model source."""
        config = self.to_dict()
        for name in _KEYED_ONLY_WHEN_SET:
            if config[name] == _field_default(name):
                del config[name]
        payload = {
            "version": SCENARIO_VERSION,
            "config": config,
            "corpus": corpus_fingerprint(self.corpus),
            "model": _model_identity(self.model),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _field_default(name: str) -> Any:
    """The dataclass default of a ScenarioConfig field (the one source of it)."""
    return next(f.default for f in dataclasses.fields(ScenarioConfig) if f.name == name)


def _model_identity(source: str | None) -> str:
    """A string that changes when the model source changes (path + size/mtime of its weights)."""
    if source is None:
        try:
            from ..sources import default_model_source

            source = default_model_source()
        except Exception:  # the default model is not installed: the key still works
            return "default"
    path = Path(source)
    parts = [str(path.resolve())]
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.is_file()) if path.is_dir() else []
    for p in files:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)

