"""Probe: fit the low-rank part under the fine-tune's own activations of the private texts.

The decomposition collects H_priv on the private texts as they arrive through the blocks already
decomposed, base-only: the inputs of alpha 0. L exists for alpha 1, where a block receives what
the fine-tune's blocks would pass on (at the secret's positions, what it memorised). This probe
carries a second copy of the private inputs through the fine-tuned blocks (each block is run
before its layers are replaced) and gives the sieve curvature, hence L's fit, that copy's H_priv:

    Hs = H_pub + lam_s · H_priv(X_ft)     instead of     H_pub + lam_s · H_priv(X_base)

The base (alpha 0) is untouched: the forget objective still reads the base's H_priv.

    PYTHONPATH=. python experiments/lowrank_inputs_probe.py --seed 0 [--bits 4] [--mode records]

Rows go to docs/lowrank_codes/inputs_probe_cpu_seed<S>.json through forget_eval's runner (alpha 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forget_eval  # noqa: E402
from libortho import calibrate  # noqa: E402
from libortho.curvatures import BlockCurvatures  # noqa: E402

dec = sys.modules["libortho.decompose"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "lowrank_codes"
STATE: dict = {"ft": None, "H": {}}


def patch_fine_tuned_private_inputs() -> None:
    fit_block, done = dec._fit_block, BlockCurvatures.done

    def fit_block_with_ft_inputs(b, plan, config, needs_h, public, private, *rest, **kw):
        if private is not None:
            if b == 0:  # block 0's inputs are the embeddings: the same for both models
                STATE["ft"] = calibrate.BlockInputs(list(private.hidden), private.masks, private.args, private.kwargs)
            if plan.block_loader is not None:
                plan.block_loader.load(b)
            block, ft = plan.blocks[b], STATE["ft"]
            STATE["H"] = dec._block_hessians(block, plan.targets[b], ft)  # the block is still the fine-tune's
            ft.hidden = calibrate.run_block(block, ft)
        return fit_block(b, plan, config, needs_h, public, private, *rest, **kw)

    def done_with_ft_inputs(self, name):
        if name in self.priv and name in STATE["H"]:  # read only by the sieve curvature from here on
            self.priv[name] = STATE["H"][name]
        return done(self, name)

    dec._fit_block = fit_block_with_ft_inputs
    BlockCurvatures.done = done_with_ft_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("records", "lookalikes"), default="records")
    ap.add_argument("--bits", type=int, choices=(16, 8, 4), default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = "members" if args.mode == "records" else "lookalikes"
    name = f"{args.mode}, L {args.bits}-bit, fine-tune's private inputs"
    forget_eval.VARIANTS[name] = (dict(forget_source=args.mode, lowrank_bits=args.bits), texts)
    patch_fine_tuned_private_inputs()
    forget_eval.ALPHAS[:] = [0.0, 1.0]
    forget_eval.WITH_QUANTIZED_REFERENCE = False
    out = DOCS / f"inputs_probe_cpu_seed{args.seed}.json"
    results = forget_eval.json.loads(out.read_text()) if out.exists() else {}
    forget_eval.run_seed(forget_eval.scenario_config("default", args.seed), results, [name], out)


if __name__ == "__main__":
    main()
