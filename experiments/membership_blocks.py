"""Which decoder blocks hold the membership signal that is left at alpha 0.

The artifact at alpha 0 is scored by the P-calibrated attack (a record's loss under the model minus
under P; AUC members against non-members), then again with the linear layers of one range of blocks
replaced by P's own (dense) weights, with the perplexity on the scenario's held-out public text (16
windows) beside it: what putting P back costs. Where putting P back removes the signal, the forget
edit left it there. The control: the same number of blocks, chosen at random, a few times.
With --donor ARTIFACT2 the layers put in come from another artifact at alpha 0 instead of P (for
example one decomposed with a stronger forget_lambda): a splice that emulates that setting in those
blocks only (the later blocks were fitted on the first artifact's inputs, not the donor's).

    python experiments/membership_blocks.py SCENARIO_DIR ARTIFACT [--ranges 0-9 10-19 20-29] [--donor ARTIFACT2]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from libortho import artifact  # noqa: E402
from libortho.evaluation import perplexity  # noqa: E402
from libortho.layer import OrthoLinear  # noqa: E402
from libortho.privacy.membership import token_logprobs  # noqa: E402
from libortho.scenario.build import Scenario  # noqa: E402
from libortho.sources import default_model_source, load_model  # noqa: E402


def summed_record_losses(model, tok, texts: list[str]) -> np.ndarray:
    """[records] each record's loss summed over its tokens (nats), as membership_segments.py's whole-record column
    (the audit's attack takes the per-token mean, membership.record_losses)."""
    return np.array([-float(lp.sum()) for lp in token_logprobs(model, tok, texts)])


def with_public_blocks(model: nn.Module, public: nn.Module, blocks: list[int], donor: nn.Module | None = None) -> dict:
    """Puts P's linear layers (or the donor artifact's) into `blocks` of `model` (in place); returns what was taken out."""
    taken = {}
    layers, p_layers = model.model.layers, public.model.layers
    for b in blocks:
        for name, module in list(layers[b].named_modules()):
            if isinstance(module, OrthoLinear):
                parent_name, _, leaf = name.rpartition(".")
                parent = layers[b].get_submodule(parent_name)
                taken[(b, name)] = module
                if donor is not None:
                    setattr(parent, leaf, donor.model.layers[b].get_submodule(name))
                    continue
                p_module = p_layers[b].get_submodule(name)
                linear = nn.Linear(module.in_features, module.out_features, bias=p_module.bias is not None)
                linear.load_state_dict(p_module.state_dict())
                setattr(parent, leaf, linear.to(next(p_module.parameters()).dtype))
    return taken


def put_back(model: nn.Module, taken: dict) -> None:
    for (b, name), module in taken.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.model.layers[b].get_submodule(parent_name), leaf, module)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", type=Path)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--ranges", nargs="+", default=["0-9", "10-19", "20-29"])
    ap.add_argument("--controls", type=int, default=3, help="random block sets per range size")
    ap.add_argument("--donor", type=Path, default=None, help="an artifact whose alpha-0 layers are put in instead of P's")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scenario = Scenario.load(args.scenario)
    records = scenario.load_members() + scenario.load_nonmembers()
    texts = [r.text for r in records]
    is_member = np.array([r.k > 0 for r in records], dtype=int)
    public, tok = load_model(scenario.public_model or default_model_source())
    base = summed_record_losses(public, tok, texts)
    model, _ = artifact.load(args.artifact, alpha=0.0, with_ortho=False)
    n_blocks = len(model.model.layers)
    donor = None if args.donor is None else artifact.load(args.donor, alpha=0.0, with_ortho=False)[0]
    source = "P" if donor is None else "the donor's layers"

    heldout = scenario.read_split("heldout")

    def measure(blocks: list[int]) -> tuple[float, float]:
        """(P-calibrated AUC, perplexity) with P's layers in `blocks`."""
        taken = with_public_blocks(model, public, blocks, donor)
        try:
            auc = float(roc_auc_score(is_member, -(summed_record_losses(model, tok, texts) - base)))
            return auc, perplexity(model, tok, heldout, max_windows=16)
        finally:
            put_back(model, taken)

    rng = random.Random(0)
    rows = {"alpha 0 (no block replaced)": measure([])}
    for spec in args.ranges:
        lo, hi = map(int, spec.split("-"))
        blocks = list(range(lo, hi + 1))
        rows[f"{source} in blocks {spec}"] = measure(blocks)
        controls = [measure(sorted(rng.sample(range(n_blocks), len(blocks)))) for _ in range(args.controls)]
        rows[f"{source} in {len(blocks)} random blocks (control, mean of {args.controls})"] = tuple(np.mean(controls, axis=0).tolist())
    rows[f"{source} in every block"] = measure(list(range(n_blocks)))
    print("| alpha 0 with | P-calibrated AUC | perplexity |\n|---|---|---|")
    for name, (auc, ppl) in rows.items():
        print(f"| {name} | {auc:.3f} | {ppl:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({name: dict(auc=a, perplexity=p) for name, (a, p) in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
