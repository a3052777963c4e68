"""A built scenario and how it is built: the fine-tuned model, the retrain reference, the
records and the public splits, cached on disk under a hash of the config."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..memory import release_freed_memory
from ..records import CanaryRecord, load_records, save_records
from .canaries import make_records
from .config import SCENARIO_VERSION, ScenarioConfig
from .corpus import SPLITS, corpus_fingerprint, public_corpus
from .finetune import finetune
from .schedule import public_windows, training_schedule

MANIFEST = "scenario.json"


@dataclass
class Scenario:
    """A built scenario: paths of its artifacts (under ``root``) plus timings and training logs."""

    root: Path
    config: ScenarioConfig
    finetuned: Path
    reference: Path
    members: Path
    nonmembers: Path
    train: Path
    calibration: Path
    heldout: Path
    public_model: str | None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def read_split(self, split: str) -> str:
        return self.split_path(split).read_text(encoding="utf-8")

    def load_members(self) -> list[CanaryRecord]:
        return load_records(self.members)

    def load_nonmembers(self) -> list[CanaryRecord]:
        return load_records(self.nonmembers)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Scenario":
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.is_file():
            raise ValueError(f"not a scenario folder (no {MANIFEST}): {root}")
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if meta.get("version") != SCENARIO_VERSION:
            raise ValueError(f"{manifest}: scenario version {meta.get('version')} != {SCENARIO_VERSION}")
        files = meta["files"]
        return cls(
            root=root,
            config=ScenarioConfig.from_dict(meta["config"]),
            public_model=meta.get("public_model"),
            timings=meta.get("timings", {}),
            stats=meta.get("stats", {}),
            **{key: root / rel for key, rel in files.items()},
        )


_FILES = {
    "finetuned": "finetuned",
    "reference": "reference",
    "members": "members.jsonl",
    "nonmembers": "nonmembers.jsonl",
    "train": "public_train.txt",
    "calibration": "public_calibration.txt",
    "heldout": "public_heldout.txt",
}


def _default_cache_dir() -> Path:
    from ..sources import cache_dir

    return cache_dir() / "scenarios"


def scenario_dir(config: ScenarioConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`build_scenario` puts (or finds) the scenario of ``config``."""
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / f"{config.preset}-{config.cache_key()}"


def _load_public_model(source: str | None):
    from ..sources import load_model

    return load_model(source, dtype=torch.float32)


def _public_model_path(source: str | None) -> str | None:
    if source is not None:
        return str(source)
    try:
        from ..sources import default_model_source

        return default_model_source()
    except Exception:
        return None


def _check_prefix_tokenization(tokenizer: Any, records: Sequence[CanaryRecord]) -> int:
    """How many records' prefix tokens are not a prefix of their text's tokens (boundary merges)."""
    bad = 0
    for r in records:
        p = list(tokenizer(r.prefix)["input_ids"])
        t = list(tokenizer(r.text)["input_ids"])
        bad += t[: len(p)] != p
    return bad


def build_scenario(
    config: ScenarioConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Scenario:
    """Build (or load from the cache) the scenario of ``config``.

    Writes, into ``scenario_dir(config, cache_dir)``: ``finetuned/`` and ``reference/`` (HF
    folders, safetensors + tokenizer), ``members.jsonl``, ``nonmembers.jsonl``, the three public
    splits as text files and ``scenario.json`` (config, timings, training logs). Everything is
    assembled in a temporary folder next to it and renamed into place at the end, so a cached
    scenario is always complete. ``cache_dir=None``: ``$LIBORTHO_CACHE/scenarios``.

    Threads are the caller's choice; note that on a CPU shared with other jobs,
    ``torch.set_num_threads(1)`` trained several times faster than 2 oversubscribed threads.
    """
    config = ScenarioConfig.default() if config is None else config
    target = scenario_dir(config, cache_dir)
    if (target / MANIFEST).is_file() and not rebuild:
        return Scenario.load(target)
    from ..fsutil import apply_umask, staged_dir

    # A temp folder named after this process: a later build removes it if this one is killed.
    # concurrent: another build of the same config may replace the entry at the same time.
    with staged_dir(target, concurrent=True) as tmp:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        members, nonmembers = make_records(config)
        save_records(members, tmp / _FILES["members"])
        save_records(nonmembers, tmp / _FILES["nonmembers"])
        for split in SPLITS:
            (tmp / _FILES[split]).write_text(public_corpus(split, config.corpus), encoding="utf-8")
        schedule = training_schedule(config, members)

        stats: dict[str, Any] = {}
        for name, recs in (("finetuned", members), ("reference", [])):
            t0 = time.perf_counter()
            model, tokenizer = _load_public_model(config.model)
            timings[f"load_{name}_s"] = round(time.perf_counter() - t0, 2)
            if name == "finetuned":
                windows = public_windows(tokenizer, config)
                stats["record_prefix_token_mismatches"] = _check_prefix_tokenization(tokenizer, members + nonmembers)
            log = finetune(
                model, tokenizer, config, recs, windows=windows,
                schedule=schedule if recs else [[] for _ in range(config.steps)],
                progress=progress, desc="fine-tune (members)" if recs else "fine-tune (reference)",
            )
            timings[f"{name}_s"] = log["seconds"]
            stats[name] = log
            t0 = time.perf_counter()
            model.save_pretrained(tmp / _FILES[name])
            tokenizer.save_pretrained(tmp / _FILES[name])
            timings[f"save_{name}_s"] = round(time.perf_counter() - t0, 2)
            del model
            release_freed_memory()  # the optimizer's state, before the next fine-tune
        timings["total_s"] = round(time.perf_counter() - t_start, 2)
        stats["n_members"] = len(members)
        stats["n_nonmembers"] = len(nonmembers)
        stats["record_insertions"] = sum(len(s) for s in schedule)
        meta = {
            "version": SCENARIO_VERSION,
            "cache_key": config.cache_key(),
            "config": config.to_dict(),
            "corpus": corpus_fingerprint(config.corpus),
            "public_model": _public_model_path(config.model),
            "files": _FILES,
            "timings": timings,
            "stats": stats,
            "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        apply_umask(tmp)  # mkdtemp made it private to this user
    return Scenario.load(target)
