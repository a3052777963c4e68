"""The forget objective: what the INT base stream is fitted to.

Plain GPTQ fits the fine-tuned weight W_ft on public inputs. With the forget objective, each
layer's base q fits two targets at once. X_pub: public calibration text; X_b: the base's own
inputs at that layer on the texts to forget (the owner's records, or look-alikes of them); W_P:
the public checkpoint P's weight. The forget texts' term is one of two (`forget_target`):

  base_inputs (the default): act like P's weight on the base's inputs,

    min_q ||(W_ft - q) X_pub||² + lam ||(W_P - q) X_b||²  =  min_q ||W* - q||²_H'
    H' = H_pub + lam H_priv ,   W* = W_ft + lam (W_P - W_ft) H_priv H'⁻¹

  public_activations: act like P on P's own inputs X_P of the same tokens (P's hidden states
  carried through P's own decoder blocks, public_target.py), so the drift of the blocks before
  is corrected rather than copied. Here X_b (for H_priv and C) is collected per input group,
  just before the group is fitted, through the base-only layers fitted before it in the block
  (o_proj's X_b through the base's q/k/v): read through the still fine-tuned layers, as the
  default target reads it, the later layers would correct the same drift a second time,

    min_q ||(W_ft - q) X_pub||² + lam ||W_P X_P - q X_b||²  =  min_q ||W* - q||²_H' + const
    H' = H_pub + lam H_priv ,   W* = W_ft + lam (W_P C - W_ft H_priv) H'⁻¹ ,   C = 2 X_P X_bᵀ / n

  (with X_P = X_b, C = H_priv and the two are the same W*). On public inputs the base acts like
  the fine-tune, on the private inputs like P. This is a least-squares model edit (as in MEMIT)
  folded into GPTQ's Hessian-aware rounding: GPTQ projects W* onto the INT grid under H'.

Conventions: X is [in, tokens]; H_pub, H_priv and C are per-token means (2XXᵀ/n over each set's own
unpadded tokens; C[i, j] = 2 Σ_t X_P[i, t] X_b[j, t] / n over the forget texts' tokens, as H_priv), and lam is relative to the traces, lam_abs = lam ·
tr(H_pub) / tr(H_priv), for each shared input. In code the private terms are pull = lam_abs·H_priv
and pull_C = lam_abs·C, and W* = W_ft + (W_P·pull_C − W_ft·pull)·H'_d⁻¹ (base_inputs: (W_P − W_ft)·
pull·H'_d⁻¹). W* is solved with GPTQ's dampening (H'_d = H' + damp · mean(diag H') · I), so it stays
anchored to W_ft where neither set of inputs looks. Without texts ("free"), lam·H_priv is replaced by
mu · mean(diag H_pub) · I: the base is pulled toward P wherever public text does not look. The
residual the ortho stream restores stays R = W_ft - W_base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import jsontext
from .config import OrthoConfig
from .quantize import add_identity_


@dataclass
class FitTarget:
    """What one layer's base is fitted to: the target W* [out, in] (float32) and H' [in, in] for GPTQ."""

    W: torch.Tensor
    H: torch.Tensor


class ForgetObjective:
    """Per-layer targets of one decoder block. Layers that read the same input (q/k/v, gate/up)
    share their H_pub object, and with it H', its Cholesky factor and H_sieve. The layer that reads an
    input last says so (`last_reader`): what was kept for that input is let go once it is served."""

    def __init__(self, config: OrthoConfig) -> None:
        self.config = config
        self._fit: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id(H_pub) -> H', L, pull
        self._sieve: dict[int, torch.Tensor] = {}  # id(H_pub) -> H_sieve

    def fit(
        self,
        W_ft: torch.Tensor,
        W_P: torch.Tensor | None,
        H_pub: torch.Tensor,
        H_priv: torch.Tensor | None,
        last_reader: bool = False,
        C: torch.Tensor | None = None,
    ) -> FitTarget:
        """W_ft, W_P [out, in]; H_pub, H_priv [in, in] per-token means on the base's inputs. forget_target
        "public_activations": C = 2 X_P X_bᵀ / n [in, in] (X as [in, tokens]: rows P's input coordinates, columns the
        base's), on the same tokens as H_priv."""
        cfg = self.config
        if not cfg.forgets or (cfg.forget_source != "free" and cfg.forget_lambda == 0):
            return FitTarget(W_ft, H_pub)
        if W_P is None:
            raise ValueError("the forget objective needs the public model's weight of every decomposed layer")
        if (C is not None) != (cfg.forget_target == "public_activations"):
            raise ValueError(f"forget_target={cfg.forget_target!r} " + ("needs" if C is None else "takes no") +
                             " C, the cross-moment of P's and the base's inputs")
        H_fit, L, pull = self._curvatures(H_pub, H_priv)
        if last_reader:
            del self._fit[id(H_pub)]  # H' goes on in the FitTarget; L and pull are freed with this call
        # H'_d is symmetric, so W* is solved on the transpose.
        if C is None:  # W* = W_ft + (W_P - W_ft) · pull · H'_d⁻¹
            B = ((W_P.float() - W_ft) @ pull).t()
        else:  # W* = W_ft + (W_P · pull_C - W_ft · pull) · H'_d⁻¹, pull_C = lam_abs · C
            pull_C = relative_weight(H_pub, H_priv, cfg.forget_lambda) * C
            B = (W_P.float() @ pull_C - W_ft @ pull).t()
            del pull_C
        W_star = W_ft + torch.cholesky_solve(B, L).t()
        return FitTarget(W_star, H_fit)

    def _curvatures(self, H_pub: torch.Tensor, H_priv: torch.Tensor | None):
        key = id(H_pub)
        if key not in self._fit:
            pull = private_pull(H_pub, H_priv, self.config)
            H_fit = H_pub + pull
            H_d = add_identity_(H_fit.clone(), self.config.damp * torch.diag(H_fit).mean())
            self._fit[key] = (H_fit, _cholesky(H_d), pull)
        return self._fit[key]

    def sieve_curvature(self, H_pub: torch.Tensor, H_priv: torch.Tensor | None, last_reader: bool = False) -> torch.Tensor:
        """H_sieve = H_pub + lam_s H_priv [in, in] for the sieve and refit (H_pub itself when lam_s = 0)."""
        lam_s = self.config.sieve_private_weight
        if lam_s == 0 or H_priv is None:
            return H_pub
        key = id(H_pub)
        if key not in self._sieve:
            self._sieve[key] = H_pub + relative_weight(H_pub, H_priv, lam_s) * H_priv
        return self._sieve.pop(key) if last_reader else self._sieve[key]


def private_pull(H_pub: torch.Tensor, H_priv: torch.Tensor | None, config: OrthoConfig) -> torch.Tensor:
    """The term that pulls the base toward P: lam_abs · H_priv, or mu · mean(diag H_pub) · I [in, in]."""
    if config.forget_source == "free":
        return config.forget_mu * torch.diag(H_pub).mean() * _eye_like(H_pub)
    if H_priv is None:
        raise ValueError(f"forget_source={config.forget_source!r} needs the forget texts' Hessians")
    return relative_weight(H_pub, H_priv, config.forget_lambda) * H_priv


def relative_weight(H_pub: torch.Tensor, H_priv: torch.Tensor, lam: float) -> float:
    """lam_abs = lam · tr(H_pub) / tr(H_priv): lam = 1 weighs both sets of inputs equally."""
    tr_priv = float(torch.diag(H_priv).sum())
    return 0.0 if tr_priv <= 0 else lam * float(torch.diag(H_pub).sum()) / tr_priv


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of H, with GPTQ's escalating dampening if H is not quite positive definite.
    H is H'_d, already a sum with c·I: no -0.0 is left in it, so H + 0·I is H itself and needs no copy."""
    mean_diag = torch.diag(H).mean().clamp_min(1e-12)
    for attempt in range(6):
        extra = 0.0 if attempt == 0 else 0.01 * 10 ** (attempt - 1) * mean_diag
        L, info = torch.linalg.cholesky_ex(H if attempt == 0 else add_identity_(H.clone(), extra))
        if info == 0:
            return L
    raise RuntimeError("H' is not positive definite even after heavy dampening; use more calibration data")


def _eye_like(H: torch.Tensor) -> torch.Tensor:
    """The identity of H's size, dtype and device (the fits run where the model's block is)."""
    return torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def read_forget_texts(path: str | Path) -> list[str]:
    """The texts to forget: a JSONL file of records ({"text": ...} or {"prefix": ..., "secret": ...}),
    or a plain text file with one text per line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"forget file {path} does not exist (or is not a file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    texts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        texts.append(_text_of_line(line, f"{path}:{lineno}") if line.lstrip().startswith("{") else line)
    if not texts:
        raise ValueError(f"{path} holds no texts to forget")
    return texts


def _text_of_line(line: str, where: str) -> str:
    try:
        obj = jsontext.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if isinstance(obj.get("text"), str) and obj["text"].strip():
        return obj["text"]
    if isinstance(obj.get("prefix"), str) and isinstance(obj.get("secret"), str):
        return obj["prefix"] + obj["secret"]
    raise ValueError(f"{where}: a record needs a non-empty 'text', or 'prefix' and 'secret' strings")
