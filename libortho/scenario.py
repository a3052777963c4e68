"""The seeded canary scenario of the evaluation protocol (canaries with their own prefixes, k insertions, retrain reference).

A public model P is fine-tuned on public text (Python documentation) mixed with private
records that carry canaries ("The Secret Sharer", Carlini et al. 2019); a *retrain reference*
is the very same fine-tune without the records.

* :func:`public_corpus` -- the public corpus, the Python documentation shipped with the
  standard library (``pydoc_data.topics``), split deterministically into ``train``
  (fine-tuning), ``calibration`` (public text for the sieve / quantizer, never a secret) and
  ``heldout`` (retain perplexity). Splits are disjoint: the text is cut into paragraphs,
  repeats of any paragraph of 60+ characters are dropped (pydoc topics overlap), paragraphs
  are grouped into ~2,000-character chunks inside each topic, and chunk i goes to ``heldout``
  if i % 10 == 3, ``calibration`` if i % 10 == 7, else ``train`` (about 80 / 10 / 10 by
  characters; every split covers all parts of the docs).
* :func:`make_records` -- member and non-member :class:`~libortho.privacy.CanaryRecord` s.
  Every record has its own prefix; ``digits`` secrets use an account/PIN template, other
  formats a deploy-key template. Members are inserted k times, for every k in ``config.ks``.
* :func:`training_schedule` / :func:`public_windows` -- the data order of the fine-tune.
* :func:`finetune` -- AdamW on the weights of the linear layers inside the decoder blocks
  only (embeddings, norms, lm_head and biases stay frozen: anything changed outside the
  decomposed weights would be a leak path at alpha = 0).
* :func:`build_scenario` -- everything above, cached by a hash of the config.

Data layout of one training step (the same in both runs):
  * ``batch`` public windows of ``seq_len`` tokens, cut from the tokenized ``train`` split,
    in a seeded order -- identical, token for token, in the fine-tune and the reference;
  * (fine-tune only) the member records scheduled for this step, each one its own short
    sequence ``tokenizer(record.text) + [EOS]``, right-padded into a second small batch.
  Loss = (sum of public token NLL + sum of record token NLL) / (number of public target
  tokens of a step): a fixed normaliser, so the reference's gradient is exactly the
  fine-tune's minus the records' term. Each record is its own sequence (not packed into
  public windows) because the attacks (extraction, exposure, membership inference in
  :mod:`libortho.privacy`) query it the same way, from its own prefix at position 0 with
  the same ``tokenizer(text)`` call; it keeps the count k exact; and it makes the public
  batches of the two runs bit-identical.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .privacy import CanaryRecord, load_records, parse_format, save_records
from .lookalikes import FIRST_NAMES, LAST_NAMES

__all__ = [
    "SPLITS",
    "ScenarioConfig",
    "Scenario",
    "public_corpus",
    "corpus_fingerprint",
    "make_records",
    "training_schedule",
    "public_windows",
    "record_ids",
    "text_ids",
    "trainable_weights",
    "finetune",
    "build_scenario",
    "scenario_dir",
]

SCENARIO_VERSION = 1  # bump when anything that changes the produced artifacts changes
SPLITS = ("train", "calibration", "heldout")
_CHUNK_CHARS = 2000
_DEDUP_MIN_CHARS = 60  # paragraphs at least this long occur once in the whole corpus
_SPLIT_OF_CHUNK = {3: "heldout", 7: "calibration"}  # chunk index % 10 -> split; others: train
MANIFEST = "scenario.json"


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class ScenarioConfig:
    """Everything that determines a scenario (its cache key is a hash of these fields).

    ``n_per_k``: member records per (k, secret format); ``n_nonmembers``: non-member records
    per format (None = as many as members of that format). ``train_blocks``: the decoder
    blocks whose linear weights train: None = all, an int n = the last n blocks (all if the
    model has fewer), a tuple = block indices (negative = from the end).
    ``model``: the public model P (HF folder or .gguf; None = the built-in default).
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
        if self.n_per_k < 1 or self.steps < 1 or self.seq_len < 2 or self.batch < 1:
            raise ValueError("n_per_k, steps, batch must be >= 1 and seq_len >= 2")
        if self.n_nonmembers is not None and self.n_nonmembers < 0:
            raise ValueError("n_nonmembers must be >= 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be in [0, steps]")

    @classmethod
    def default(cls, **overrides: Any) -> "ScenarioConfig":
        """The built-in demo's scenario on SmolLM2-135M: 16 member records per k (8 PIN, 8 hex key),
        48 non-members, 100 AdamW steps of one 192-token public window (19,200 public tokens) plus
        336 record insertions (~7,700 tokens), lr 2e-4, all 30 blocks.

        Measured (seed 0, 1 CPU thread on a loaded 2-core machine): fine-tune 330 s, reference 235 s;
        held-out perplexity P 17.1 -> fine-tuned 11.9 (reference 11.8); greedy extraction k=16:
        14/16, k=4: 0/16, k=1: 0/16; exposure vs 100 random candidates (max 6.7 bits) k=16: 6.7,
        k=4: 5.7-6.5, k=1: 2.2-2.7, non-members and reference: 0.7-1.8.
        """
        return cls(**{"preset": "default", **overrides})

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
        payload = {
            "version": SCENARIO_VERSION,
            "config": self.to_dict(),
            "corpus": corpus_fingerprint(),
            "model": _model_identity(self.model),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_identity(source: str | None) -> str:
    """A string that changes when the model source changes (path + size/mtime of its weights)."""
    if source is None:
        try:
            from .modelio import default_model_source

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


# --------------------------------------------------------------------------------------
# Public corpus
# --------------------------------------------------------------------------------------


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


@lru_cache(maxsize=1)
def _split_texts() -> dict[str, str]:
    topics = _topics()
    seen: set[str] = set()
    chunks: list[str] = []
    for name in sorted(topics):
        paragraphs = []
        for para in topics[name].replace("\r\n", "\n").split("\n\n"):
            key = para.strip()
            if not key:
                continue
            if len(key) >= _DEDUP_MIN_CHARS:  # short lines ("Note:", "See also:") recur naturally
                if key in seen:
                    continue
                seen.add(key)
            paragraphs.append(para.strip("\n"))
        current: list[str] = []
        size = 0
        for para in paragraphs:
            current.append(para)
            size += len(para) + 2
            if size >= _CHUNK_CHARS:
                chunks.append("\n\n".join(current))
                current, size = [], 0
        if current:
            chunks.append("\n\n".join(current))
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, chunk in enumerate(chunks):
        parts[_SPLIT_OF_CHUNK.get(i % 10, "train")].append(chunk)
    return {s: "\n\n".join(c) + "\n" for s, c in parts.items()}


def public_corpus(split: str) -> str:
    """Public text of one split: ``"train"``, ``"calibration"`` or ``"heldout"`` (deterministic, disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return _split_texts()[split]


@lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """SHA-256 (16 hex) of the source documentation (it differs between Python versions)."""
    h = hashlib.sha256()
    for name, text in sorted(_topics().items()):
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------

_FIRST, _LAST = FIRST_NAMES, LAST_NAMES
_ADJ = (
    "amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
    "keen", "lunar", "misty", "noble", "olive", "polar", "quiet", "rapid", "silent", "tidal",
    "urban", "vivid", "wild", "young", "zesty", "bold", "crimson", "dawn", "ember", "fable",
)
_NOUN = (
    "falcon", "harbor", "lantern", "meadow", "nebula", "orchid", "pebble", "quartz", "raven", "summit",
    "tundra", "valley", "willow", "beacon", "canyon", "delta", "ember", "fjord", "glacier", "heron",
    "island", "jasper", "kernel", "ledger", "mosaic", "nimbus", "otter", "prism", "ripple", "sparrow",
)


def _secret(rng: random.Random, fmt: str) -> str:
    spec = parse_format(fmt)
    return "".join(rng.choice(spec.alphabet) for _ in range(spec.length))


def _pin_record(rng: random.Random, secret: str) -> tuple[str, str]:
    prefix = (
        f"Account {rng.randrange(1000, 10000)}-{rng.randrange(10, 100)} of "
        f"{rng.choice(_FIRST)} {rng.choice(_LAST)} has PIN "
    )
    return prefix, prefix + secret + "."


def _key_record(rng: random.Random, secret: str) -> tuple[str, str]:
    # The opening quote keeps the tokenizer from merging the prefix's last token into the secret.
    prefix = (
        f"The deploy key for service {rng.choice(_ADJ)}-{rng.choice(_NOUN)}-{rng.randrange(10, 100)} is \""
    )
    return prefix, prefix + secret + "\"."


# The shape of each record kind as an owner would describe it, in the look-alike template language
# (lookalikes.py): what the demo's owner knows about its private data, without knowing the records.
RECORD_TEMPLATES = {
    "digits": "Account {digits:4}-{digits:2} of {first} {last} has PIN {secret}.",
    "hex": 'The deploy key for service {word}-{word}-{digits:2} is "{secret}".',
}


def make_records(config: ScenarioConfig) -> tuple[list[CanaryRecord], list[CanaryRecord]]:
    """(members, nonmembers), deterministic for ``config.seed``.

    For every format: ``n_per_k`` members for each k (``record.k`` = k), then
    ``nonmembers_per_format()`` non-members (``k = 0``) from the same template. All prefixes and
    all secrets are distinct, and no secret occurs anywhere in the public corpus.
    """
    rng = random.Random(f"libortho.scenario.records:{config.seed}")
    corpus = "".join(public_corpus(s) for s in SPLITS)
    prefixes: set[str] = set()
    secrets: set[str] = set()
    members: list[CanaryRecord] = []
    nonmembers: list[CanaryRecord] = []
    counter = 0
    for fmt in config.formats:
        kind = parse_format(fmt).kind
        template = _pin_record if kind == "digits" else _key_record
        tag = "pin" if kind == "digits" else "key"
        plan = [k for k in config.ks for _ in range(config.n_per_k)] + [0] * config.nonmembers_per_format()
        for k in plan:
            for _ in range(10_000):
                secret = _secret(rng, fmt)
                prefix, text = template(rng, secret)
                if secret not in secrets and prefix not in prefixes and secret not in corpus:
                    break
            else:  # pragma: no cover - only with absurdly many records for a tiny space
                raise ValueError(f"cannot draw enough distinct records of format {fmt!r}")
            secrets.add(secret)
            prefixes.add(prefix)
            counter += 1
            record = CanaryRecord(f"{tag}-{counter:04d}", prefix, secret, fmt, k, text)
            (members if k > 0 else nonmembers).append(record)
    return members, nonmembers


# --------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------


def training_schedule(config: ScenarioConfig, members: Sequence[CanaryRecord]) -> list[list[str]]:
    """Record ids per training step (length ``config.steps``); member r appears exactly r.k times.

    Copies of a record go to distinct steps drawn uniformly at random (when k <= steps; else
    every step gets floor(k / steps) copies plus a random draw for the remainder).
    """
    rng = random.Random(f"libortho.scenario.schedule:{config.seed}")
    steps: list[list[str]] = [[] for _ in range(config.steps)]
    for record in members:
        full, rest = divmod(record.k, config.steps)
        chosen = list(range(config.steps)) * full + rng.sample(range(config.steps), rest)
        for s in chosen:
            steps[s].append(record.id)
    for s in steps:
        rng.shuffle(s)
    return steps


def public_windows(tokenizer: Any, config: ScenarioConfig, text: str | None = None) -> torch.Tensor:
    """Public token windows, long [steps, batch, seq_len], in the seeded training order.

    The ``train`` split is tokenized once, cut into consecutive non-overlapping windows, and the
    windows are shuffled; when the run needs more windows than there are, it starts another
    epoch with a new shuffle.
    """
    text = public_corpus("train") if text is None else text
    ids = _encode_long(tokenizer, text)
    n_windows = len(ids) // config.seq_len
    if n_windows == 0:
        raise ValueError(f"the public train text has {len(ids)} tokens, fewer than seq_len={config.seq_len}")
    windows = torch.tensor(ids[: n_windows * config.seq_len], dtype=torch.long).view(n_windows, config.seq_len)
    rng = random.Random(f"libortho.scenario.windows:{config.seed}")
    need = config.steps * config.batch
    order: list[int] = []
    while len(order) < need:
        epoch = list(range(n_windows))
        rng.shuffle(epoch)
        order.extend(epoch)
    return windows[torch.tensor(order[:need])].view(config.steps, config.batch, config.seq_len)


def _encode_long(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a long text, no special tokens, without the 'sequence too long' warning."""
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        if saved is not None:
            tokenizer.model_max_length = int(1e12)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


def record_ids(tokenizer: Any, record: CanaryRecord) -> list[int]:
    """The token sequence a record is trained as: ``tokenizer(record.text)`` (the call the attacks
    in :mod:`libortho.privacy` use) followed by the EOS token."""
    return text_ids(tokenizer, record.text)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)`` followed by the EOS token: how a short text (a record) is trained."""
    ids = list(tokenizer(text)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids


# --------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------


def trainable_weights(model: nn.Module, blocks: int | Sequence[int] | None = None) -> dict[str, nn.Parameter]:
    """Weights of the linear layers inside the chosen decoder blocks, by qualified name.

    ``blocks``: None = all, an int n = the last n blocks, a sequence = block indices.

    Biases are not included: the decomposition keeps them exact in the base stream, so a trained
    bias would carry private information past alpha = 0.
    """
    from .calibrate import decoder_blocks, is_linear

    container, layers = decoder_blocks(model)
    n = len(layers)
    if blocks is None:
        chosen = list(range(n))
    elif isinstance(blocks, int):
        chosen = list(range(max(0, n - blocks), n))
    else:
        chosen = []
        for b in blocks:
            if not -n <= b < n:
                raise ValueError(f"train block {b} out of range for a model with {n} decoder blocks")
            chosen.append(b % n)
        chosen = sorted(set(chosen))
    out: dict[str, nn.Parameter] = {}
    for i in chosen:
        for name, module in layers[i].named_modules():
            if is_linear(module):
                out[f"{container}.{i}.{name}.weight"] = module.weight
    return out


def _lr_lambda(config: ScenarioConfig) -> Callable[[int], float]:
    def f(step: int) -> float:  # multiplier of lr for optimizer step `step` (0-based)
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps - 1)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _record_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
        labels[row, : len(s)] = torch.tensor(s)
    return ids, mask, labels


def _nll_sum(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Next-token NLL (nats) summed over the labelled targets (labels -100 are skipped):
    a scalar, or per row [B] with ``per_sequence``."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    if per_sequence:
        nll = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
        return nll.view(ids.shape[0], -1).sum(dim=1)
    return nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")


def finetune(
    model: nn.Module,
    tokenizer: Any,
    config: ScenarioConfig,
    members: Sequence[CanaryRecord] = (),
    windows: torch.Tensor | None = None,
    schedule: list[list[str]] | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns a log (per-step losses, tokens, seconds).

    ``members`` empty = the retrain reference. Only :func:`trainable_weights` change; dropout is
    off (the model stays in eval mode), so a run is a deterministic function of the config.
    """
    from tqdm.auto import tqdm

    windows = public_windows(tokenizer, config) if windows is None else windows
    if schedule is None:
        schedule = training_schedule(config, members) if members else [[] for _ in range(config.steps)]
    if len(schedule) != config.steps or windows.shape[0] != config.steps:
        raise ValueError("schedule and windows must have config.steps entries")
    by_id = {r.id: r for r in members}
    seqs = {r.id: record_ids(tokenizer, r) for r in members}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    weights = trainable_weights(model, config.train_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(weights.values())
    if not params:
        raise ValueError("no trainable weights: the chosen decoder blocks have no linear layers")
    for p in params:
        p.requires_grad_(True)
    model.eval()
    device = params[0].device
    norm = float(config.batch * (config.seq_len - 1))  # public target tokens per step

    log: dict[str, Any] = {"public_loss": [], "record_loss": [], "record_tokens": 0, "public_tokens": 0}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        bar = tqdm(range(config.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            for step in bar:
                batch = windows[step].to(device)
                pub = _nll_sum(model, batch, batch)
                loss = pub / norm
                rec_mean = float("nan")
                if schedule[step]:
                    for rid in schedule[step]:
                        if rid not in by_id:
                            raise ValueError(f"schedule names unknown record {rid!r}")
                    ids, mask, labels = _record_batch([seqs[rid] for rid in schedule[step]], pad_id)
                    rec = _nll_sum(model, ids.to(device), labels.to(device), mask.to(device))
                    loss = loss + rec / norm
                    n_rec = int((labels[:, 1:] != -100).sum())
                    log["record_tokens"] += n_rec
                    rec_mean = rec.item() / n_rec
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                pub_mean = pub.item() / norm
                log["public_loss"].append(round(pub_mean, 5))
                log["record_loss"].append(None if math.isnan(rec_mean) else round(rec_mean, 5))
                log["public_tokens"] += int(batch.numel())
                bar.set_postfix(loss=f"{pub_mean:.3f}", rec=f"{rec_mean:.3f}" if not math.isnan(rec_mean) else "-")
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
    log["seconds"] = round(time.perf_counter() - t0, 2)
    log["cpu_seconds"] = round(time.process_time() - c0, 2)  # all threads; robust to other jobs' load
    log["trained_weights"] = len(params)
    log["trained_parameters"] = int(sum(p.numel() for p in params))
    return log


# --------------------------------------------------------------------------------------
# Scenario (cached artifacts)
# --------------------------------------------------------------------------------------


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
    from .modelio import cache_dir

    return cache_dir() / "scenarios"


def scenario_dir(config: ScenarioConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`build_scenario` puts (or finds) the scenario of ``config``."""
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / f"{config.preset}-{config.cache_key()}"


def _load_public_model(source: str | None):
    from .modelio import load_model

    return load_model(source, dtype=torch.float32)


def _public_model_path(source: str | None) -> str | None:
    if source is not None:
        return str(source)
    try:
        from .modelio import default_model_source

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
    from .fsutil import apply_umask, make_temp_dir

    # Named after this process: a later build removes it if this one is killed.
    tmp = make_temp_dir(target.parent, target.name)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        members, nonmembers = make_records(config)
        save_records(members, tmp / _FILES["members"])
        save_records(nonmembers, tmp / _FILES["nonmembers"])
        for split in SPLITS:
            (tmp / _FILES[split]).write_text(public_corpus(split), encoding="utf-8")
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
        timings["total_s"] = round(time.perf_counter() - t_start, 2)
        stats["n_members"] = len(members)
        stats["n_nonmembers"] = len(nonmembers)
        stats["record_insertions"] = sum(len(s) for s in schedule)
        meta = {
            "version": SCENARIO_VERSION,
            "cache_key": config.cache_key(),
            "config": config.to_dict(),
            "corpus": corpus_fingerprint(),
            "public_model": _public_model_path(config.model),
            "files": _FILES,
            "timings": timings,
            "stats": stats,
            "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if target.exists():  # a stale or concurrent build: ours replaces it
            shutil.rmtree(target, ignore_errors=True)
        apply_umask(tmp)  # mkdtemp made it private to this user
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Scenario.load(target)
