"""Look-alike records: texts of the same shape as the private records, never trained.

An owner often knows the shape of the sensitive data ("Account 4821 of <name> has PIN <6 digits>")
but not every record in it. Look-alikes filled from that shape serve as forget texts: the forget
objective then makes the base act like the public model on every input of that shape.

Template slots: ``{secret}`` (required, once; drawn from the secret format), ``{first}``,
``{last}`` (built-in name lists), ``{word}`` (a built-in word list), ``{digits:N}`` and
``{hex:N}`` (random strings of N characters). ``{{`` and ``}}`` are literal braces.
"""
from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Iterable

from .names import ADJECTIVES, FIRST_NAMES, LAST_NAMES, NOUNS
from .records import CanaryRecord, parse_format

# {word} draws from fewer words than the scenario's deploy keys (the first 20 adjectives, the first
# 10 nouns): the list look-alikes have always used, so that seeded look-alikes stay the same.
WORDS = ADJECTIVES[:20] + NOUNS[:10]
_SLOT = re.compile(r"\{([a-z]+)(?::(\d+))?\}")
_FILLERS = {"first": FIRST_NAMES, "last": LAST_NAMES, "word": WORDS}
_RANDOM = {"digits": string.digits, "hex": "0123456789abcdef"}
_MAX_TRIES_PER_RECORD = 1000
_MAX_ENUMERATED = 1_000_000  # spaces this small are listed when random draws keep hitting taken secrets


def check_template(template: str) -> None:
    """Raise ValueError naming what is wrong with a look-alike template."""
    body = template.replace("{{", "").replace("}}", "")
    slots = _SLOT.findall(body)
    if sum(1 for name, _ in slots if name == "secret") != 1:
        raise ValueError(f"template {template!r} must contain the slot {{secret}} exactly once")
    for name, length in slots:
        if name == "secret" and length:
            raise ValueError("{secret} takes no length: its format comes from --format")
        if name in _RANDOM and not length:
            raise ValueError(f"slot {{{name}}} needs a length, e.g. {{{name}:4}}")
        if name not in _RANDOM and name not in _FILLERS and name != "secret":
            known = ", ".join(["{secret}", "{first}", "{last}", "{word}", "{digits:N}", "{hex:N}"])
            raise ValueError(f"unknown slot {{{name}}} in template {template!r}; known slots: {known}")
    leftover = _SLOT.sub("", body)
    if "{" in leftover or "}" in leftover:
        raise ValueError(f"template {template!r} has an unmatched brace; write literal braces as {{{{ and }}}}")


def lookalike_records(
    template: str,
    secret_format: str,
    n: int,
    seed: int = 0,
    exclude: Iterable[str] = (),
    id_prefix: str = "lookalike",
) -> list[CanaryRecord]:
    """n records from `template`, each with a fresh random secret of `secret_format` that is not in
    `exclude` and not repeated. Deterministic for a seed. Records have k = 0 (never trained)."""
    check_template(template)
    spec = parse_format(secret_format)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    banned = set(exclude)
    available = spec.size - len({s for s in banned if spec.contains(s)})
    if available < n:
        outside = f" outside the exclusion list ({available} left)" if banned else f" ({available} in all)"
        raise ValueError(f"the format {secret_format} has fewer than {n} secrets{outside}; "
                         "ask for fewer records or a longer format")
    rng = random.Random(f"libortho.lookalikes:{seed}")
    records = []
    for i in range(n):
        secret = _fresh_secret(rng, spec, banned)
        banned.add(secret)
        prefix, _, suffix = _fill(template, rng).partition("\0")
        records.append(CanaryRecord(f"{id_prefix}-{i}", prefix, secret, secret_format, 0, prefix + secret + suffix))
    return records


def _fresh_secret(rng: random.Random, spec, banned: set[str]) -> str:
    for _ in range(_MAX_TRIES_PER_RECORD):
        secret = "".join(rng.choice(spec.alphabet) for _ in range(spec.length))
        if secret not in banned:
            return secret
    # Nearly every secret of the space is taken (n close to its size): draw among those left.
    if spec.size <= _MAX_ENUMERATED:
        left = [s for s in map("".join, itertools.product(spec.alphabet, repeat=spec.length)) if s not in banned]
        if left:
            return rng.choice(left)
    raise ValueError(f"could not draw a secret of {spec.length} characters that is not taken "
                     f"in {_MAX_TRIES_PER_RECORD} tries; ask for fewer records or a longer format")


def _fill(template: str, rng: random.Random) -> str:
    """The template with every slot filled and {secret} marked by a NUL character."""

    def slot(match: re.Match) -> str:
        name, length = match.group(1), match.group(2)
        if name == "secret":
            return "\0"
        if name in _RANDOM:
            return "".join(rng.choice(_RANDOM[name]) for _ in range(int(length)))
        return rng.choice(_FILLERS[name])

    pieces = template.split("{{")
    filled = [_SLOT.sub(slot, piece.replace("}}", "\x01")) for piece in pieces]
    return "{".join(filled).replace("\x01", "}")
