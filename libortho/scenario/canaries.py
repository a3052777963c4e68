"""Private records with canaries ("The Secret Sharer", Carlini et al. 2019): their templates,
the seeded members and non-members of a scenario, and the token sequence a record trains as.

Every record has its own prefix; its template comes from the config's template family
(:mod:`.templates`; by default ``digits`` secrets use an account/PIN template, other formats a
deploy-key template). Members are inserted k times, for every k in ``config.ks``.
"""
from __future__ import annotations

import random
from typing import Any

from ..lookalikes import lookalike_records
from ..records import CanaryRecord, parse_format
from .config import ScenarioConfig
from .corpus import SPLITS, public_corpus
from .templates import FAMILIES, template_family


def _secret(rng: random.Random, fmt: str) -> str:
    spec = parse_format(fmt)
    return "".join(rng.choice(spec.alphabet) for _ in range(spec.length))


# The shape of each record kind of the default family as an owner would describe it, in the
# look-alike template language (lookalikes.py): what the demo's owner knows about its private data,
# without knowing the records. Every family's descriptions: ``template_family(name).owner_template``.
RECORD_TEMPLATES = {
    "digits": FAMILIES["default"].digits_owner_template,
    "hex": FAMILIES["default"].other_owner_template,
}


def make_records(config: ScenarioConfig) -> tuple[list[CanaryRecord], list[CanaryRecord]]:
    """(members, nonmembers), deterministic for ``config.seed``.

    For every format: ``n_per_k`` members for each k (``record.k`` = k), then
    ``nonmembers_per_format()`` non-members (``k = 0``) from the same template. All prefixes and
    all secrets are distinct, and no secret occurs anywhere in the config's public corpus. Records
    follow the config's template family; outside the default family each secret occurs exactly
    once in its record's text, right after the prefix.
    """
    # The seed string names this module's old path; it stays so that every scenario draws the same records.
    rng = random.Random(f"libortho.scenario.records:{config.seed}")
    family = template_family(config.templates)
    corpus = "".join(public_corpus(s, config.corpus) for s in SPLITS)
    prefixes: set[str] = set()
    secrets: set[str] = set()
    members: list[CanaryRecord] = []
    nonmembers: list[CanaryRecord] = []
    counter = 0
    for fmt in config.formats:
        kind = parse_format(fmt).kind
        template = family.record_maker(fmt)
        tag = "pin" if kind == "digits" else "key"
        plan = [k for k in config.ks for _ in range(config.n_per_k)] + [0] * config.nonmembers_per_format()
        for k in plan:
            for _ in range(10_000):
                secret = _secret(rng, fmt)
                prefix, text = template(rng, secret)
                once = not family.secret_once or text.count(secret) == 1
                if secret not in secrets and prefix not in prefixes and secret not in corpus and once:
                    break
            else:  # pragma: no cover - only with absurdly many records for a tiny space
                raise ValueError(f"cannot draw enough distinct records of format {fmt!r}")
            secrets.add(secret)
            prefixes.add(prefix)
            counter += 1
            record = CanaryRecord(f"{tag}-{counter:04d}", prefix, secret, fmt, k, text)
            (members if k > 0 else nonmembers).append(record)
    return members, nonmembers


def owner_lookalikes(config: ScenarioConfig, seed: int, per_format: int | None = None) -> list[CanaryRecord]:
    """Look-alikes of the config's records, filled from the owner's descriptions of its template
    family (never from the records): ``per_format`` per secret format (None: as many as members),
    ids ``lookalike-<kind>-<i>``, k = 0. Deterministic for ``seed``."""
    family = template_family(config.templates)
    records: list[CanaryRecord] = []
    for fmt in config.formats:
        kind = parse_format(fmt).kind
        records += lookalike_records(
            family.owner_template(fmt), fmt, per_format or config.members_per_format(),
            seed=seed, id_prefix=f"lookalike-{kind}",
        )
    return records


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
