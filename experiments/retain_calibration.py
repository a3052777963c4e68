"""Calibration text with the owner's look-alikes in it: does keeping the fine-tune's behaviour on
records that were never trained lower the alpha-0 membership signal in records mode?

The forget objective pulls each layer toward P on the members' inputs and keeps it at the fine-tune
on public text (forget.py). The non-members of the audit share the members' template and name lists,
so the fine-tune's knowledge of that shape is pulled away together with the members' own, and the
P-calibrated attack compares what is left of each. Adding look-alikes (records of the same shape,
never trained) to the public side, X_pub = [look-alikes | public text], keeps the fine-tune on the
shape and leaves the pull to what the members do not share with it. In the closed form only H' changes
(H_pub gains the look-alikes' inputs): W* = W_ft + lam (W_P - W_ft) H_priv H'^-1.

Writes, for one cached scenario, three files into OUT:
  calib_retain.txt   4 x (--times) as many owner look-alikes as members (another seed than the scenario's), then the
                     scenario's public calibration text;
  calib_control.txt  as many tokens of the fine-tune's public training text, then the same calibration text
                     (the control: the same budget of extra public-side tokens, none shaped like a record);
  lookalikes_x4.jsonl the look-alikes used (x{times}).

    python experiments/retain_calibration.py ~/.cache/libortho/scenarios/default-1efb256405cecabf /tmp/ret/seed0
    libortho decompose $S/finetuned /tmp/ret/seed0/art_retain --calib /tmp/ret/seed0/calib_retain.txt \\
        --calib-tokens 12288 --forget $S/members.jsonl --forget-kind records --public-model default
    libortho audit /tmp/ret/seed0/art_retain --public $S/public_heldout.txt --private $S/members.jsonl \\
        --nonmembers $S/nonmembers.jsonl --public-model default --sample-extraction 0 --alpha 0 --out ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from forget_eval import calibration_prefix, forget_texts  # noqa: E402
from libortho.scenario.build import Scenario  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", type=Path, help="a cached scenario folder (built by forget_eval.py)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--times", type=int, default=4, help="look-alikes per member (4: the screen's)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    scenario = Scenario.load(args.scenario)
    members, seed = scenario.load_members(), scenario.config.seed
    tok = AutoTokenizer.from_pretrained(args.scenario / "finetuned")
    calibration = scenario.read_split("calibration")
    shaped, n_tokens = calibration_prefix("lookalikes", scenario, members, seed, tok, args.times)
    unshaped, _ = calibration_prefix("train", scenario, members, seed, tok, args.times)
    lookalikes = forget_texts(f"lookalikes x{args.times}", scenario, members, seed)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calib_retain.txt").write_text(shaped + calibration)
    (args.out / "calib_control.txt").write_text(unshaped + calibration)
    (args.out / f"lookalikes_x{args.times}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lookalikes))
    print(f"{args.scenario.name}: {len(lookalikes)} look-alikes, {n_tokens} tokens; control: as many of the training text")


if __name__ == "__main__":
    main()
