import re

import pytest

from libortho.lookalikes import FIRST_NAMES, LAST_NAMES, check_template, lookalike_records
from libortho.scenario import TEMPLATE_FAMILIES, ScenarioConfig, make_records, owner_lookalikes, template_family

TEMPLATE = "Account {digits:4} of {first} {last} has PIN {secret}."


def test_records_fill_every_slot_and_mark_the_secret():
    records = lookalike_records(TEMPLATE, "digits:6", 20, seed=3)
    assert len({r.secret for r in records}) == 20
    for r in records:
        assert r.text == r.prefix + r.secret + "." and r.k == 0 and r.secret_format == "digits:6"
        words = r.prefix.split()
        assert words[0] == "Account" and len(words[1]) == 4 and words[1].isdigit()
        assert words[3] in FIRST_NAMES and words[4] in LAST_NAMES
    assert lookalike_records(TEMPLATE, "digits:6", 20, seed=3) == records
    assert lookalike_records(TEMPLATE, "digits:6", 20, seed=4) != records


def test_never_emits_an_excluded_secret():
    exclude = [str(d) for d in range(10) if d != 7]
    records = lookalike_records("PIN {secret}", "digits:1", 1, exclude=exclude)
    assert [r.secret for r in records] == ["7"]
    excluded = {f"{i:02d}" for i in range(0, 100, 3)}
    records = lookalike_records("code {secret}!", "digits:2", 100 - len(excluded), exclude=excluded)
    assert not excluded & {r.secret for r in records}
    with pytest.raises(ValueError, match="fewer than 2 secrets"):
        lookalike_records("PIN {secret}", "digits:1", 2, exclude=exclude)


@pytest.mark.parametrize("template, message", [
    ("no secret here", "exactly once"),
    ("{secret} and {secret}", "exactly once"),
    ("{secret} {digits}", "needs a length"),
    ("{secret} {colour}", "unknown slot"),
    ("{secret} {", "unmatched brace"),
])
def test_bad_templates_say_what_is_wrong(template, message):
    with pytest.raises(ValueError, match=message):
        check_template(template)


def test_literal_braces():
    (record,) = lookalike_records('{{"pin": "{secret}"}}', "hex:4", 1)
    assert record.text == '{"pin": "' + record.secret + '"}'


# ---- the owner's descriptions of the scenario's template families ------------------------------

_SLOT_PATTERNS = {"first": "[A-Z][a-z]+", "last": "[A-Z][a-z]+", "word": "[a-z]+", "digits": r"\d", "hex": "[0-9a-f]"}


def template_regex(template: str) -> re.Pattern:
    """A regex that texts filled from the template match in full; the secret is the group "secret"."""
    out = []
    for piece in re.split(r"(\{[a-z]+(?::\d+)?\})", template):
        slot = re.fullmatch(r"\{([a-z]+)(?::(\d+))?\}", piece)
        if slot is None:
            out.append(re.escape(piece.replace("{{", "{").replace("}}", "}")))
        elif slot.group(1) == "secret":
            out.append("(?P<secret>[0-9a-zA-Z]+)")
        else:
            out.append(_SLOT_PATTERNS[slot.group(1)] + (f"{{{slot.group(2)}}}" if slot.group(2) else ""))
    return re.compile("".join(out))


@pytest.mark.parametrize("family", TEMPLATE_FAMILIES)
def test_owner_lookalikes_parse_as_the_family_and_are_never_a_member(family):
    for seed in range(3):
        config = ScenarioConfig.default(templates=family, seed=seed, n_per_k=4)
        members, nonmembers = make_records(config)
        lookalikes = owner_lookalikes(config, seed=seed + 1000)
        assert len(lookalikes) == len(members)
        assert not {r.text for r in lookalikes} & {r.text for r in members + nonmembers}
        assert not {r.prefix for r in lookalikes} & {r.prefix for r in members}
        for records in (lookalikes, members):  # the owner's description fits the look-alikes and the records
            for r in records:
                check_template(template_family(family).owner_template(r.secret_format))
                match = template_regex(template_family(family).owner_template(r.secret_format)).fullmatch(r.text)
                assert match is not None, (family, r.text)
                assert match.group("secret") == r.secret and match.start("secret") == len(r.prefix)
        assert owner_lookalikes(config, seed=seed + 1000) == lookalikes


def test_owner_lookalikes_of_the_default_family_are_the_demos():
    from libortho.demo import LOOKALIKE_SEED_OFFSET, demo_lookalikes

    for config in (ScenarioConfig.default(), ScenarioConfig.demo(seed=2)):
        assert owner_lookalikes(config, config.seed + LOOKALIKE_SEED_OFFSET) == demo_lookalikes(config)
