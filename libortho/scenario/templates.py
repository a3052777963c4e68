"""Record template families: how a scenario's private records read, and how their owner would
describe them.

A family gives, for each secret format, the generator of one record (its prefix, and its full text
around a drawn secret) and the owner's description of that kind of record in the look-alike
template language (:mod:`libortho.lookalikes`). The two are written separately on purpose: the
forget objective's look-alikes are filled from what the owner would write, never drawn by the
generator of the records.

* ``default``: one sentence; an account/PIN line for ``digits`` secrets, a deploy-key line for
  the other formats;
* ``prose``: a support-ticket paragraph; the account number (``digits``) or a recovery code
  (other formats) in the middle of it;
* ``code``: a short Python snippet; a PIN passed to a login call (``digits``) or an API key
  passed to a client (other formats).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..names import ADJECTIVES, FIRST_NAMES, LAST_NAMES, NOUNS
from ..records import parse_format

# A record generator: (seeded rng, secret) -> (prefix, full text); the text starts with prefix + secret.
RecordMaker = Callable[[random.Random, str], tuple[str, str]]


@dataclass(frozen=True)
class TemplateFamily:
    """Record generators and the owner's descriptions of them, one pair for ``digits`` secrets and
    one for every other format. ``secret_once``: a drawn record is kept only if its secret occurs
    once in its text (the default family predates the check and keeps its draws as they were)."""

    name: str
    digits_record: RecordMaker
    other_record: RecordMaker
    digits_owner_template: str
    other_owner_template: str
    secret_once: bool = True

    def record_maker(self, fmt: str) -> RecordMaker:
        """The generator of records whose secret has format ``fmt``."""
        return self.digits_record if parse_format(fmt).kind == "digits" else self.other_record

    def owner_template(self, fmt: str) -> str:
        """The owner's description of records whose secret has format ``fmt``."""
        return self.digits_owner_template if parse_format(fmt).kind == "digits" else self.other_owner_template


# ---- default: one sentence per record ----------------------------------------------------------


def _pin_record(rng: random.Random, secret: str) -> tuple[str, str]:
    prefix = (
        f"Account {rng.randrange(1000, 10000)}-{rng.randrange(10, 100)} of "
        f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)} has PIN "
    )
    return prefix, prefix + secret + "."


def _key_record(rng: random.Random, secret: str) -> tuple[str, str]:
    # The opening quote keeps the tokenizer from merging the prefix's last token into the secret.
    prefix = (
        f"The deploy key for service {rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.randrange(10, 100)} is \""
    )
    return prefix, prefix + secret + "\"."


# ---- prose: a support ticket with the secret mid-paragraph -------------------------------------


def _ticket_account_record(rng: random.Random, secret: str) -> tuple[str, str]:
    # The prefix ends in a space, as the PIN sentence does: digits then tokenize one per token.
    prefix = (
        f"Customer {rng.randrange(1000, 10000)} wrote in about the {rng.choice(ADJECTIVES)} "
        f"{rng.choice(NOUNS)} plan. Their name is {rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}, "
        "and their account number is "
    )
    return prefix, prefix + secret + ". The ticket was closed the same day."


def _ticket_recovery_record(rng: random.Random, secret: str) -> tuple[str, str]:
    prefix = (
        f"Customer {rng.randrange(1000, 10000)} lost access to the {rng.choice(ADJECTIVES)} "
        f"{rng.choice(NOUNS)} workspace. After checking the ID of {rng.choice(FIRST_NAMES)} "
        f"{rng.choice(LAST_NAMES)}, support issued the recovery code \""
    )
    return prefix, prefix + secret + "\", valid for one day."


# ---- code: a Python snippet with the secret as a string argument -------------------------------


def _login_snippet_record(rng: random.Random, secret: str) -> tuple[str, str]:
    prefix = (
        f"from {rng.choice(NOUNS)}_bank import Client\n\n"
        f"client = Client(account={rng.randrange(1000, 10000)}, "
        f"owner=\"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}\")\n"
        "client.verify(pin=\""
    )
    return prefix, prefix + secret + "\")\nprint(client.balance())\n"


def _api_key_snippet_record(rng: random.Random, secret: str) -> tuple[str, str]:
    prefix = (
        f"from {rng.choice(NOUNS)}_sdk import Client\n\n"
        "client = Client(\n"
        f"    project=\"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.randrange(10, 100)}\",\n"
        "    api_key=\""
    )
    return prefix, prefix + secret + "\",\n)\nclient.ping()\n"


FAMILIES: dict[str, TemplateFamily] = {
    "default": TemplateFamily(
        "default", _pin_record, _key_record,
        "Account {digits:4}-{digits:2} of {first} {last} has PIN {secret}.",
        'The deploy key for service {word}-{word}-{digits:2} is "{secret}".',
        secret_once=False,
    ),
    "prose": TemplateFamily(
        "prose", _ticket_account_record, _ticket_recovery_record,
        "Customer {digits:4} wrote in about the {word} {word} plan. Their name is {first} {last}, "
        "and their account number is {secret}. The ticket was closed the same day.",
        "Customer {digits:4} lost access to the {word} {word} workspace. After checking the ID of "
        '{first} {last}, support issued the recovery code "{secret}", valid for one day.',
    ),
    "code": TemplateFamily(
        "code", _login_snippet_record, _api_key_snippet_record,
        'from {word}_bank import Client\n\nclient = Client(account={digits:4}, owner="{first} {last}")\n'
        'client.verify(pin="{secret}")\nprint(client.balance())\n',
        'from {word}_sdk import Client\n\nclient = Client(\n    project="{word}-{word}-{digits:2}",\n'
        '    api_key="{secret}",\n)\nclient.ping()\n',
    ),
}
TEMPLATE_FAMILIES = tuple(FAMILIES)
DEFAULT_FAMILY = "default"  # the family of every scenario cached before there was a choice


def template_family(name: str) -> TemplateFamily:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown record template family {name!r}; known: {', '.join(TEMPLATE_FAMILIES)}")
    return FAMILIES[name]
