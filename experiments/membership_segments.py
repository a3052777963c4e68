"""Which part of a record carries the P-calibrated membership signal.

The P-calibrated attack scores a record by its loss under the audited model minus its loss under P.
Here that difference is split by the record's parts (in the text before the secret: the words most
records share, the other words such as names, the digits; the secret; the rest; a token belongs to
the part of its last character) and each part's summed difference gets its own
AUC, members against non-members. A part with AUC near 0.5 carries no signal; the part that stays far
from it at alpha 0 is what the forget objective leaves of the fine-tune.

    python experiments/membership_segments.py SCENARIO_DIR ARTIFACT [--public GGUF] [--json out.json]

SCENARIO_DIR: a cached scenario (members.jsonl, nonmembers.jsonl, finetuned/, reference/).
Rows: the fine-tune, the reference (never saw the records), the artifact at alpha 0 and at alpha 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from libortho import artifact, switch  # noqa: E402
from libortho.privacy.membership import token_logprobs  # noqa: E402
from libortho.records import CanaryRecord  # noqa: E402
from libortho.scenario.build import Scenario  # noqa: E402
from libortho.sources import default_model_source, load_model  # noqa: E402

PARTS = ("template words", "other words", "prefix digits", "secret", "after secret")
_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"[0-9]+(?:-[0-9]+)*")


def template_words(records: list[CanaryRecord]) -> set[str]:
    """The words of the prefixes that at least half of all records share (the template's own words)."""
    counts: dict[str, int] = {}
    for r in records:
        for word in set(_WORD.findall(r.prefix)):
            counts[word] = counts.get(word, 0) + 1
    return {w for w, c in counts.items() if c >= len(records) / 2}


def _part_of_chars(record: CanaryRecord, template: set[str]) -> np.ndarray:
    """[len(text)] index into PARTS of each character (spaces and punctuation of the prefix count as template)."""
    text, prefix = record.text, record.prefix
    part = np.full(len(text), PARTS.index("after secret"))
    part[: len(prefix)] = PARTS.index("template words")
    for m in _WORD.finditer(prefix):
        if m.group() not in template:
            part[m.start(): m.end()] = PARTS.index("other words")
    for m in _NUMBER.finditer(prefix):
        part[m.start(): m.end()] = PARTS.index("prefix digits")
    start = text.find(record.secret, len(prefix) - 1)
    part[start: start + len(record.secret)] = PARTS.index("secret")
    return part


def _token_parts(tokenizer, record: CanaryRecord, template: set[str]) -> np.ndarray:
    """[T - 1] the part of each predicted token (tokens 1..T-1), by its last character (a token " Diego" is a name)."""
    enc = tokenizer(record.text, return_offsets_mapping=True)
    chars = _part_of_chars(record, template)
    parts = [chars[min(end - 1, len(chars) - 1)] if end > start else PARTS.index("template words")
             for start, end in enc["offset_mapping"]]
    return np.array(parts[1:])


def part_losses(model, tokenizer, records: list[CanaryRecord]) -> np.ndarray:
    """[records, parts] summed loss (nats) of each part's tokens."""
    lps = token_logprobs(model, tokenizer, [r.text for r in records])
    template = template_words(records)
    out = np.zeros((len(records), len(PARTS)))
    for i, (record, lp) in enumerate(zip(records, lps)):
        parts = _token_parts(tokenizer, record, template)
        for j in range(len(PARTS)):
            out[i, j] = -float(lp.numpy()[parts == j].sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", type=Path)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--public", default=None, help="P (default: the scenario's public model)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    scenario = Scenario.load(args.scenario)
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()
    records = members + nonmembers
    is_member = np.array([1] * len(members) + [0] * len(nonmembers))
    P, tok = load_model(args.public or scenario.public_model or default_model_source())
    base = part_losses(P, tok, records)
    del P
    rows: dict[str, np.ndarray] = {}
    for label, folder in (("fine-tune", scenario.finetuned), ("reference", scenario.reference)):
        model, _ = load_model(folder)
        rows[label] = part_losses(model, tok, records)
        del model
    model, _ = artifact.load(args.artifact, alpha=0.0, with_ortho=True)
    for alpha in (0.0, 1.0):
        with switch.alpha(model, alpha):
            rows[f"alpha {alpha:g}"] = part_losses(model, tok, records)
    report = {}
    print("| model | " + " | ".join(f"{p}: AUC (mean Δ members / non-members, nats)" for p in PARTS + ("whole record",)) + " |")
    print("|---" * (len(PARTS) + 2) + "|")
    for label, losses in rows.items():
        diff = losses - base  # loss under the model minus under P, per part
        diff = np.concatenate([diff, diff.sum(1, keepdims=True)], axis=1)
        cells = []
        for j in range(diff.shape[1]):
            auc = roc_auc_score(is_member, -diff[:, j])
            cells.append((auc, diff[is_member == 1, j].mean(), diff[is_member == 0, j].mean()))
        report[label] = {name: dict(auc=a, member=m, nonmember=n) for name, (a, m, n) in zip(PARTS + ("whole record",), cells)}
        print(f"| {label} | " + " | ".join(f"{a:.2f} ({m:+.2f} / {n:+.2f})" for a, m, n in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
