"""Which low-rank fit restores the residual: the fits of libortho/lowrank.py at equal rank, over
every decomposed layer of a model decomposed with the forget objective.

Per layer, from libortho's own stages (plan_decomposition -> quantize_model, records mode):
R = W_ft - W_base, the edit Delta = W_ft - W*, H_priv, H' and Hs (the sieve's curvature,
H_pub + lam_s H_priv). Per fit and rank, ratios of sums over layers:

  weighted  tr((R - L) Hs (R - L)^T) / tr(R Hs R^T)     what alpha = 1 leaves of the residual, under Hs
  priv(D)   ||(Delta - L) X_priv^T|| / ||Delta X_priv^T||  the edit's action on the private inputs, restored
  priv(R)   ||(R - L) X_priv^T|| / ||R X_priv^T||          W_base + L against W_ft on the private inputs

Fits: (a) edit_eigenbasis of Delta (components by mu, or by their gain); (b) weighted_svd of R
under Hs; (c) random_subspace of R under Hs. References: (b) of Delta under H_priv (the best
rank-r restoration of the edit on the private inputs), and the sparse sieve at the same bytes per
layer (diag score under Hs, refit; CSR at fp16 values, int32 columns and row pointers). Last line:
(a) at each layer's own k = rank H_priv, where it restores the edit exactly.

    python experiments/lowrank_fit.py [--seed 0] [--ranks 2 4 8 16 32] [--perturb noise|train] [--model default]

The tiny model (default): a random 2-block Llama as P and a perturbed copy as the fine-tune
(Gaussian noise on the blocks' weights, or Adam steps on the forget texts); 5 to 20 seconds on
two cores. --model default: the built-in SmolLM2-135M as P and a perturbed copy of it (much longer).
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from libortho.config import OrthoConfig
from libortho.csr import csr_from_flat_indices
from libortho.decompose import quantize_model
from libortho.plan import plan_decomposition
from libortho.hf_model import decoder_blocks
from libortho.lm import pad_sequences
from libortho.lowrank import edit_eigenbasis, random_subspace, weighted_svd
from libortho.scenario import public_corpus
from libortho.sieve import impact, refit_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import char_tokenizer, tiny_llama  # noqa: E402

FIRST = ["Mara", "Ilse", "Tomas", "Jun", "Odile", "Ravi", "Keld", "Ana"]
LAST = ["Quint", "Varga", "Okafor", "Lindqvist", "Moreau", "Hale", "Brandt", "Sato"]


def forget_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Account {rng.randrange(10**4):04d} of {rng.choice(FIRST)} {rng.choice(LAST)} has PIN "
            f"{rng.randrange(10**6):06d}." for _ in range(n)]


def perturbed(P: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """W_ft = W_P + scale·std(W_P)·N(0, 1) on every matrix inside the decoder blocks."""
    ft = copy.deepcopy(P)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder_blocks(ft)[1].parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return ft


def trained(P: torch.nn.Module, tok, texts: list[str], steps: int, seed: int) -> torch.nn.Module:
    """The fine-tune as Adam steps (full batch) on the forget texts: an edit aimed at their inputs."""
    torch.manual_seed(seed)
    ft = copy.deepcopy(P)
    ids, _, labels = pad_sequences([tok(t)["input_ids"] for t in texts], pad_id=1)
    opt = torch.optim.Adam(decoder_blocks(ft)[1].parameters(), lr=3e-3)
    ft.train()
    for _ in range(steps):
        loss = ft(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ft.eval()


def layers_of(ft, P, tok, config: OrthoConfig, texts: list[str]) -> list[dict]:
    """Per decomposed layer: R, Delta [out, in], Hs, H_priv, H' [in, in] (float32), from
    LayerParts.edit, which the driver keeps for lowrank_fit="edit"."""
    config = replace(config, ortho_budget=0.0, lowrank_fit="edit")
    plan = plan_decomposition(ft, tok, public_corpus("calibration"), config, P, texts)
    parts, _ = quantize_model(ft, plan, config, progress=False)
    return [dict(key=key, R=p.R, Hs=p.H, delta=p.edit[0], H_priv=p.edit[1], H_prime=p.edit[2])
            for key, p in parts.items()]


def quad(F: torch.Tensor, H: torch.Tensor) -> float:
    """tr(F H F^T)."""
    return float(torch.sum((F @ H) * F))


def sparse_at_bytes(R: torch.Tensor, Hs: torch.Tensor, nbytes: int, damp: float) -> torch.Tensor:
    """The sieve's correction within nbytes (fp16 values, int32 columns and row pointers) [out, in]."""
    out_features = R.shape[0]
    nnz = max(0, (nbytes - 4 * (out_features + 1)) // 6)
    idx = torch.topk(impact(R.float(), Hs.float(), "diag").reshape(-1), min(nnz, R.numel())).indices
    csr = refit_values(csr_from_flat_indices(idx, R.float(), torch.float32), R.float(), Hs.float(), damp)
    return csr.to_dense().double()


def measure(layers: list[dict], corrections) -> tuple[float, float, float]:
    """(weighted, priv(D), priv(R)) summed over layers, for corrections[i] [out, in] of layer i."""
    sums = torch.zeros(6, dtype=torch.float64)
    for layer, M in zip(layers, corrections):
        R, D, Hs, Hp = (layer[name].double() for name in ("R", "delta", "Hs", "H_priv"))
        sums += torch.tensor([quad(R - M, Hs), quad(R, Hs), quad(D - M, Hp), quad(D, Hp), quad(R - M, Hp), quad(R, Hp)])
    return float(sums[0] / sums[1]), float((sums[2] / sums[3]).sqrt()), float((sums[4] / sums[5]).sqrt())


def print_row(rank: int, nbytes: int, name: str, values: tuple[float, float, float]) -> None:
    print(f"{rank:>4} {nbytes / 1024:>8.1f}  {name:<36} " + " ".join(f"{v:>8.4f}" for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--model", default=None, help="'default': the built-in SmolLM2-135M (else the tiny Llama)")
    ap.add_argument("--perturb", choices=("noise", "train"), default="noise")
    ap.add_argument("--noise", type=float, default=0.05, help="relative noise of the perturbed fine-tune")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--n-forget", type=int, default=4)
    ap.add_argument("--lam", type=float, default=OrthoConfig.forget_lambda)
    ap.add_argument("--lam-s", type=float, default=1.0, help="sieve_private_weight: Hs = H_pub + lam_s H_priv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    texts = forget_texts(args.n_forget, args.seed)
    if args.model == "default":
        from libortho.sources import load_model

        P, tok = load_model(None)
        config = OrthoConfig(group_size=64, calib_tokens=2048, seq_len=256, batch_size=4)
    else:
        tok = char_tokenizer()
        torch.manual_seed(args.seed)
        P = tiny_llama(len(tok), seed=args.seed)
        config = OrthoConfig(group_size=32, calib_tokens=4096, seq_len=128)
    config = OrthoConfig(**{**config.to_dict(), "forget_source": "records", "forget_lambda": args.lam,
                            "sieve_private_weight": args.lam_s, "seed": args.seed})
    if args.perturb == "train":
        ft = trained(P, tok, texts, args.train_steps, args.seed)
    else:
        ft = perturbed(P, args.noise, args.seed)
    layers = layers_of(ft, P, tok, config, texts)
    print(f"{len(layers)} layers, {sum(lay['R'].numel() for lay in layers)} weights; perturb={args.perturb}, "
          f"lam={args.lam}, lam_s={args.lam_s}; decomposed in {time.perf_counter() - start:.1f} s")

    r_max, damp = max(args.ranks), config.damp
    fit_a = [edit_eigenbasis(lay["delta"], lay["H_priv"], lay["H_prime"], r_max, damp) for lay in layers]
    fit_a_gain = [edit_eigenbasis(lay["delta"], lay["H_priv"], lay["H_prime"], r_max, damp, "gain") for lay in layers]
    fit_b = [weighted_svd(lay["R"], lay["Hs"], r_max, damp) for lay in layers]
    ref_b = [weighted_svd(lay["delta"], lay["H_priv"], r_max, damp) for lay in layers]
    print(f"\n{'rank':>4} {'KiB':>8}  {'fit':<36} {'weighted':>9} {'priv(D)':>8} {'priv(R)':>8}")
    print_row(0, 0, "none (L = 0)", measure(layers, (torch.zeros(lay["R"].shape, dtype=torch.float64) for lay in layers)))
    for r in sorted(args.ranks):
        nbytes = [2 * min(r, *lay["R"].shape) * sum(lay["R"].shape) for lay in layers]
        # Each row's corrections are made one layer at a time as measure() reads them (a model's worth
        # of dense float64 matrices per row would not fit for SmolLM2).
        rows = {
            "(a) edit eigenbasis of D, top mu": (f.leading(r).to_dense().double() for f in fit_a),
            "(a) edit eigenbasis of D, top gain": (f.leading(r).to_dense().double() for f in fit_a_gain),
            "(b) weighted SVD of R under Hs": (f.leading(r).to_dense().double() for f in fit_b),
            "(c) random subspace, R under Hs": (
                random_subspace(lay["R"], lay["Hs"], r, torch.Generator().manual_seed(args.seed * 1000 + i), damp).to_dense().double()
                for i, lay in enumerate(layers)),
            "ref: (b) of D under H_priv": (f.leading(r).to_dense().double() for f in ref_b),
            "ref: sparse sieve, same bytes": (sparse_at_bytes(lay["R"], lay["Hs"], n, damp) for lay, n in zip(layers, nbytes)),
        }
        for name, corrections in rows.items():
            print_row(r, sum(nbytes), name, measure(layers, corrections))
    # (a) at each layer's own rank k = rank H_priv (eigenvalues above 1e-6 of the largest): exact by construction.
    ks = [int((ev > 1e-6 * ev.max()).sum()) for ev in (torch.linalg.eigvalsh(lay["H_priv"].double()) for lay in layers)]
    at_k = (edit_eigenbasis(lay["delta"], lay["H_priv"], lay["H_prime"], k, damp).to_dense().double() for lay, k in zip(layers, ks))
    weighted, priv_delta, priv_R = measure(layers, at_k)
    kib = sum(2 * k * sum(lay["R"].shape) for lay, k in zip(layers, ks)) / 1024
    print(f"\n(a) at each layer's k = rank H_priv (k from {min(ks)} to {max(ks)}, {kib:.1f} KiB): "
          f"weighted {weighted:.4f}, priv(D) {priv_delta:.2e}, priv(R) {priv_R:.4f}")
    print(f"{time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
