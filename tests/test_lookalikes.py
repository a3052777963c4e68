import pytest

from libortho.lookalikes import FIRST_NAMES, LAST_NAMES, check_template, lookalike_records

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
