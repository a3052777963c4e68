"""Screen: would storing L = B·A as integer codes buy back alpha 1 at the same bytes?

At fp16, L costs 2 r (out + in) bytes. With int8 codes (one scale per rank component) the same bytes
buy twice the rank; with int4 codes in groups of 64 (an fp16 scale each) almost four times. This
screen emulates both on the privacy preset: the ranks of a 2× / 4× fp16 budget, then B and A
rounded to the codes and back (`fake_quantize`), so the layer still stores fp16 and the audit runs
unchanged. The fp16 rows at the same budgets are the bound the codes can reach.

    PYTHONPATH=. python experiments/lowrank_codes_screen.py --seed 0 [--mode records|lookalikes]

Rows go to docs/lowrank_codes/screen_cpu_seed<S>_<mode>.json through forget_eval's runner (alpha 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forget_eval  # noqa: E402
from libortho import ortho_split  # noqa: E402
from libortho.lowrank import LowRank, dampened  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "lowrank_codes"
CODES = {"int8": (8, None), "int4 g64": (4, 64)}


def fake_quantize(t: torch.Tensor, bits: int, group: int | None, dim: int) -> torch.Tensor:
    """Symmetric absmax rounding of t to `bits`-bit codes and back: one scale per slice along `dim`
    (group None) or per `group` consecutive values of each slice."""
    qmax = 2 ** (bits - 1) - 1
    x = t.float().movedim(dim, -1)
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], -1, group)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    q = (x / scale).round().clamp(-qmax, qmax) * scale
    return q.reshape(shape).movedim(-1, dim).to(t.dtype)


def patch_codes(bits: int, group: int | None) -> None:
    """Replace the fp16 storage of L by its rounding to codes (A per rank row, B per rank column)."""
    original = ortho_split._stored

    def stored(L: LowRank, dtype: torch.dtype) -> LowRank:
        L = original(L, dtype)
        if L.rank == 0:
            return L
        return LowRank(fake_quantize(L.B, bits, group, dim=0), fake_quantize(L.A, bits, group, dim=1))

    ortho_split._stored = stored


def patch_codes_with_refit(bits: int, group: int | None) -> None:
    """A rounded first, then B refitted to what the rounded A can carry (the least-squares B of
    lowrank.random_subspace, under the layer's curvature), then B rounded."""
    original = ortho_split.fit_lowrank

    def fit(p, E, rank, config, generator):
        L = original(p, E, rank, config, generator)
        if L.rank == 0:
            return L
        A = fake_quantize(L.A.double(), bits, group, dim=1)
        HA = dampened(ortho_split._curvature(p), config.damp).double() @ A.t()
        B = torch.linalg.solve(A @ HA, (E.double() @ HA).t()).t()
        return LowRank(fake_quantize(B, bits, group, dim=0).float(), A.float())

    ortho_split.fit_lowrank = fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("records", "lookalikes"), default="records")
    ap.add_argument("--codes", choices=("fp16", *CODES), default="fp16")
    ap.add_argument("--refit", action="store_true", help="refit B to the rounded A before rounding B")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="fp16 budgets (ranks)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = "members" if args.mode == "records" else "lookalikes"
    names = []
    for budget in args.budgets:
        name = f"{args.mode}, L ranks of fp16 {budget:g}, {args.codes}" + (", B refit" if args.refit else "")
        forget_eval.VARIANTS[name] = (dict(forget_source=args.mode, ortho_budget=budget), texts)
        names.append(name)
    if args.codes != "fp16":
        (patch_codes_with_refit if args.refit else patch_codes)(*CODES[args.codes])
    forget_eval.ALPHAS[:] = [1.0]
    forget_eval.WITH_QUANTIZED_REFERENCE = False
    DOCS.mkdir(parents=True, exist_ok=True)
    out = DOCS / f"screen_cpu_seed{args.seed}_{args.mode}.json"
    results = forget_eval.json.loads(out.read_text()) if out.exists() else {}
    forget_eval.run_seed(forget_eval.scenario_config("default", args.seed), results, names, out)


if __name__ == "__main__":
    main()
