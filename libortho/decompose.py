"""`decompose(model, calibration_texts, config)`: split every chosen linear layer of a causal LM
into an INT base stream and a sparse ortho stream, decoder block by decoder block.

Block i is calibrated on the output of the already-decomposed blocks < i at alpha = 0, so
the base stream is fitted to its own inputs: it has to be a self-consistent model on its own.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibrate
from .layer import AlphaState, OrthoLinear, attach_alpha_state
from .quantize import QuantizedWeight, QuantSpec, gptq, hinv_upper, rtn
from .sieve import (
    OrthoCSR,
    SieveSpec,
    csr_from_flat_indices,
    flipped_codes,
    fisher_ratio_scores,
    forget_scores,
    global_threshold,
    impact,
    refit_values,
    rows_of_crow,
    select_at_or_above,
    select_layer,
)

METHODS = ("gptq", "rtn")
# Which weights the forget-aware sieve reverts to P: the integrated-gradient attribution contrast,
# the diagonal-Fisher ratio F_private / F_public, a random control, or the reference-aware set of
# flipped INT codes (largest |W_ft - W_P| first); "+flipped" restricts a criterion to flipped codes.
FORGET_SELECTIONS = ("attribution", "fisher", "random", "flipped", "attribution+flipped", "fisher+flipped")
ORTHO_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class OrthoConfig:
    """Everything that decides a decomposition. Plain data: stored in libortho.json."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    method: str = "gptq"
    act_order: bool = False
    damp: float = 0.01
    gptq_block_size: int = 128
    score: str = "diag"
    ortho_ratio: float = 0.01
    budget: str = "global"
    threshold: float | None = None
    ortho_dtype: str = "float16"
    ortho_refit: bool = True  # ortho values re-fitted on their support under H (see sieve.refit_values)
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 8
    include: str | None = None  # regex on linear names inside a block; None = all
    # Forget-aware sieve (needs the public model P and the records to hide):
    forget_ratio: float = 0.0  # fraction of weights whose fine-tuning update is reverted in the base
    # How much a weight's benefit to public text protects it from the revert. 0 measured best:
    # 1.6 bits less PIN exposure and 0.09 less loss AUC at alpha 0 than 1.0, for 0.3 PPL (docs/RESULTS.md).
    forget_public_weight: float = 0.0
    attribution_points: int = 2  # integrated-gradient points along W_P -> W_ft
    attribution_public_windows: int = 8  # public windows (of seq_len // 2 tokens) for the public attribution
    forget_selection: str = "attribution"  # see FORGET_SELECTIONS; "random" is the control
    forget_fill: str = "public"  # base value on the forget support: P's weight, or "zero" (pruning baseline)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not known; choose one of {METHODS}")
        if self.ortho_dtype not in ORTHO_DTYPES:
            raise ValueError(f"ortho_dtype={self.ortho_dtype!r}; choose one of {tuple(ORTHO_DTYPES)}")
        if self.forget_selection not in FORGET_SELECTIONS:
            raise ValueError(f"forget_selection={self.forget_selection!r}; choose one of {FORGET_SELECTIONS}")
        if self.forget_public_weight < 0:
            raise ValueError(f"forget_public_weight={self.forget_public_weight} must be >= 0")
        if self.forget_fill not in ("public", "zero"):
            raise ValueError(f"forget_fill={self.forget_fill!r}; choose 'public' or 'zero'")
        if not 0.0 <= self.forget_ratio <= self.ortho_ratio:
            raise ValueError(
                f"forget_ratio={self.forget_ratio} must lie in [0, ortho_ratio={self.ortho_ratio}]: "
                "reverted weights are restored by the ortho stream"
            )
        if self.calib_tokens < 1 or self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("calib_tokens, seq_len and batch_size must be positive")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ValueError(f"include={self.include!r} is not a valid regular expression ({err})") from None
        self.quant_spec, self.sieve_spec  # validates both

    @property
    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    @property
    def sieve_spec(self) -> SieveSpec:
        return SieveSpec(self.score, self.ortho_ratio, self.budget, self.threshold, self.damp)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecompositionStats:
    seconds: float = 0.0
    n_layers: int = 0
    n_weights: int = 0
    n_ortho: int = 0
    n_forget: int = 0  # weights whose fine-tuning update was reverted in the base (forget-aware sieve)
    layer_output_error: dict[str, float] = field(default_factory=dict)  # ||WX - W_base X||_F^2 / ||WX||_F^2 on calibration data


def quantize_base(
    W: torch.Tensor, H: torch.Tensor | None, config: OrthoConfig, Hinv_upper: torch.Tensor | None = None
) -> QuantizedWeight:
    """Base stream of one layer: GPTQ under H, or plain round-to-nearest."""
    if config.method == "rtn" or H is None:
        return rtn(W, config.quant_spec)
    return gptq(W, H, config.quant_spec, config.damp, config.gptq_block_size, config.act_order, Hinv_upper)


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H Eᵀ) / tr(W H Wᵀ): the relative squared output error on the calibration inputs."""
    E = (W - W_hat).float()
    return float(torch.sum((E @ H) * E) / torch.sum((W.float() @ H) * W.float()).clamp_min(1e-30))


@dataclass
class LayerParts:
    """One decomposed layer before the sieve: base stream, residual R = W - W_base [out, in],
    its proxy Hessian H [in, in] (None without calibration) and bias."""

    base: QuantizedWeight
    R: torch.Tensor
    H: torch.Tensor | None
    bias: torch.Tensor | None


def quantize_model(
    model: nn.Module,
    tokenizer,
    calibration_text: str,
    config: OrthoConfig,
    progress: bool = True,
) -> tuple[dict[tuple[int, str], LayerParts], DecompositionStats]:
    """Quantize the base stream block by block; chosen linears become base-only OrthoLinear in place.

    Block i is calibrated on the alpha = 0 output of blocks < i. Returns every layer's parts,
    keyed by (block index, name inside the block), so one base can be sieved in several ways.
    """
    start = time.perf_counter()
    stats = DecompositionStats()
    model.eval()
    needs_h = config.method == "gptq" or config.score != "magnitude" or config.ortho_refit
    windows = calibrate.calibration_windows(tokenizer, calibration_text, config.calib_tokens, config.seq_len)
    _, blocks = calibrate.decoder_blocks(model)
    all_targets = [calibrate.target_linears(block, config.include) for block in blocks]
    if not any(all_targets):
        raise ValueError(f"no linear layer inside the decoder blocks matches include={config.include!r}")
    inputs = calibrate.capture_block_inputs(model, windows, config.batch_size)

    parts: dict[tuple[int, str], LayerParts] = {}
    for b, (block, targets) in enumerate(tqdm(list(zip(blocks, all_targets)), desc="decompose", unit="block", disable=not progress)):
        collector = calibrate.HessianCollector(targets) if needs_h else None
        if collector is not None:
            calibrate.run_block(block, inputs)
            collector.close()
        factors: dict[int, torch.Tensor] = {}  # one Cholesky factor per distinct H (q/k/v share theirs)
        for name, module in targets.items():
            W = calibrate.linear_weight(module).float().cpu()
            H = collector.hessian(name).cpu() if collector is not None else None
            factor = None
            if H is not None and config.method == "gptq" and not config.act_order:
                factor = factors.setdefault(id(H), hinv_upper(H, config.damp))
            base = quantize_base(W, H, config, factor)
            W_base = base.dequantize()
            bias = getattr(module, "bias", None)
            bias = None if bias is None else bias.detach().float().cpu()
            parts[(b, name)] = LayerParts(base, (W - W_base).contiguous(), H, bias)
            if H is not None:
                stats.layer_output_error[f"{b}.{name}"] = relative_output_error(W, W_base, H)
            stats.n_weights += W.numel()
            calibrate.replace_submodule(block, name, _base_only_layer(base, bias, module))
        inputs.hidden = calibrate.run_block(block, inputs)  # what block b+1 sees: the base stream's output
        for module in block.modules():
            if isinstance(module, OrthoLinear):
                module.clear_cache()  # a dense copy of every base would double the memory
    stats.n_layers = len(parts)
    stats.seconds = time.perf_counter() - start
    return parts, stats


def sieve_model(
    parts: dict[tuple[int, str], LayerParts],
    config: OrthoConfig,
    forced: dict[tuple[int, str], torch.Tensor] | None = None,
) -> dict[tuple[int, str], OrthoCSR]:
    """Choose each layer's ortho entries (global or per-layer budget, or threshold) and their values.

    forced: flat indices per layer that must be in the ortho stream (the forget support); they
    count against the budget and the sieve fills the rest.
    """
    ortho_dtype = ORTHO_DTYPES[config.ortho_dtype]
    forced = forced or {}
    n_forced = sum(int(f.numel()) for f in forced.values())
    total = sum(p.R.numel() for p in parts.values())
    spec = replace(config.sieve_spec, ortho_ratio=max(0.0, config.ortho_ratio - n_forced / total))
    scores = _LayerScores(parts, spec, forced)
    threshold = global_threshold(scores, spec.ortho_ratio) if spec.budget == "global" else None
    orthos = {}
    for key, p in parts.items():
        s = scores[key]
        idx = select_at_or_above(s, threshold) if threshold is not None else select_layer(s, spec)
        del s
        forced_idx = forced.get(key, torch.zeros(0, dtype=torch.long)).long()
        if not (config.ortho_refit and p.H is not None):
            orthos[key] = csr_from_flat_indices(torch.cat([idx, forced_idx]), p.R, ortho_dtype)
            continue
        # Forced entries carry their exact residual (alpha = 1 restores the fine-tuned weight there);
        # the sieve's own entries are re-fitted to what is left.
        R = p.R.contiguous()
        R_left = R.clone()
        R_left.view(-1)[forced_idx] = 0
        free = refit_values(csr_from_flat_indices(idx, R_left, torch.float32), R_left, p.H, spec.damp)
        values = torch.zeros_like(R)
        values[rows_of_crow(free.crow).long(), free.col.long()] = free.val
        values.view(-1)[forced_idx] = R.view(-1)[forced_idx]
        orthos[key] = csr_from_flat_indices(torch.cat([idx, forced_idx]), values, ortho_dtype)
    return orthos


class _LayerScores:
    """Every layer's impact scores, recomputed on each pass rather than held all at once
    (they are as large as the model's weights); forced entries score -inf."""

    def __init__(self, parts: dict[tuple[int, str], LayerParts], spec: SieveSpec, forced: dict) -> None:
        self.parts, self.spec, self.forced = parts, spec, forced

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        p = self.parts[key]
        s = impact(p.R, p.H, self.spec.score, self.spec.damp)
        if key in self.forced:
            s.view(-1)[self.forced[key]] = -float("inf")
        return s

    def __iter__(self):
        return (self[key] for key in self.parts)


def install(
    model: nn.Module,
    parts: dict[tuple[int, str], LayerParts],
    orthos: dict[tuple[int, str], OrthoCSR],
    config: OrthoConfig,
    alpha: float = 0.0,
) -> int:
    """Put the final OrthoLinear layers into `model` sharing one alpha switch; returns the ortho nnz.

    The switch starts at `alpha` = 0 (fail closed): the ortho stream only joins when asked for."""
    _, blocks = calibrate.decoder_blocks(model)
    n_ortho = 0
    for (b, name), p in parts.items():
        layer = OrthoLinear.from_parts(p.base, orthos[(b, name)], p.bias).to(_module_device(blocks[b]))
        calibrate.replace_submodule(blocks[b], name, layer)
        n_ortho += orthos[(b, name)].nnz
    attach_alpha_state(model, AlphaState(default=alpha))
    model.libortho_config = config
    return n_ortho


def decompose(
    model: nn.Module,
    tokenizer,
    calibration_text: str,
    config: OrthoConfig | None = None,
    progress: bool = True,
    public_model: nn.Module | None = None,
    forget_texts: list[str] | None = None,
) -> DecompositionStats:
    """Replace the linear layers of `model`'s decoder blocks by OrthoLinear layers, in place.

    calibration_text: public text only (never the secrets you will test for).
    With config.forget_ratio > 0 (forget-aware sieve), `public_model` is the public checkpoint P
    the model was fine-tuned from and `forget_texts` the records to hide: the weights whose
    fine-tuning update served those records most (and public text least) take P's value in the
    base and their full value in the ortho stream.
    Returns timing and per-layer statistics; the model's alpha starts at 0 (ask for more with
    ``libortho.alpha`` or ``libortho.set_alpha``).
    """
    config = config or OrthoConfig()
    start = time.perf_counter()
    forget = {}
    if config.forget_ratio > 0:
        forget = revert_private_updates(model, tokenizer, calibration_text, config, public_model, forget_texts, progress)
    finetuned = {key: W for key, (W, _) in forget.items()}
    parts, stats = quantize_model(model, tokenizer, calibration_text, config, progress)
    for key, W_ft in finetuned.items():  # the ortho stream restores the fine-tuned weights
        parts[key].R = W_ft - parts[key].base.dequantize()
    forced = {key: idx for key, (_, idx) in forget.items()}
    stats.n_ortho = install(model, parts, sieve_model(parts, config, forced), config)
    stats.n_forget = sum(int(i.numel()) for i in forced.values())
    stats.seconds = time.perf_counter() - start
    return stats


def revert_private_updates(
    model: nn.Module,
    tokenizer,
    public_text: str,
    config: OrthoConfig,
    public_model: nn.Module | None,
    forget_texts: list[str] | None,
    progress: bool = True,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Set the forget support of every chosen linear back to P's weights, in place.

    Returns {(block, name): (W_ft [out, in], flat indices reverted)}.
    """
    if public_model is None or not forget_texts:
        raise ValueError("the forget-aware sieve needs public_model (the checkpoint P) and forget_texts (the records to hide)")
    blocks_name, blocks = calibrate.decoder_blocks(model)
    _, public_blocks = calibrate.decoder_blocks(public_model)
    if len(blocks) != len(public_blocks):
        raise ValueError("public_model does not have the architecture of the fine-tuned model")
    keys, W_P = [], {}
    for b, block in enumerate(blocks):
        for name in calibrate.target_linears(block, config.include):
            W_public = calibrate.linear_weight(public_blocks[b].get_submodule(name)).float()
            if tuple(W_public.shape) != tuple(calibrate.linear_weight(block.get_submodule(name)).shape):
                raise ValueError(f"public_model's {b}.{name} has another shape than the fine-tuned model's")
            keys.append((b, name))
            W_P[f"{blocks_name}.{b}.{name}"] = W_public
    modules = dict(model.named_modules())
    W_ft = {name: calibrate.linear_weight(modules[name]).float().clone() for name in W_P}
    flipped = {}
    criterion = config.forget_selection.removesuffix("+flipped")
    if config.forget_selection.endswith("flipped"):  # reference-aware
        flipped = {
            name: flipped_codes(W_ft[name], W, config.quant_spec)
            for name, W in W_P.items()
        }
    if criterion == "random":
        generator = torch.Generator().manual_seed(config.seed)
        scores = {name: torch.rand(W.shape, generator=generator) for name, W in W_P.items()}
    elif criterion == "flipped":
        scores = {name: (W_ft[name] - W).abs() for name, W in W_P.items()}
    else:
        windows = calibrate.calibration_windows(
            tokenizer, public_text, config.attribution_public_windows * (config.seq_len // 2), config.seq_len // 2
        )
        public_batches = [(w, torch.ones_like(w)) for w in windows.split(4)]
        private_batches = calibrate.text_batches(tokenizer, list(forget_texts))
        if criterion == "fisher":
            # At W_ft the memorised records sit at a minimum where their gradients vanish; the
            # midpoint of the fine-tuning path still sees which weights were pulled towards them.
            with calibrate.weights_at(model, {name: (W + W_ft[name]) / 2 for name, W in W_P.items()}):
                F_private = calibrate.empirical_fisher(model, list(W_P), private_batches)
                F_public = calibrate.empirical_fisher(model, list(W_P), public_batches)
            scores = fisher_ratio_scores(F_private, F_public)
        else:
            A_private = calibrate.update_attribution(model, W_P, private_batches, config.attribution_points)
            A_public = (calibrate.update_attribution(model, W_P, public_batches, config.attribution_points)
                        if config.forget_public_weight else None)
            scores = forget_scores(A_private, A_public, config.forget_public_weight)
    for name, mask in flipped.items():
        scores[name][~mask] = -float("inf")
    threshold = global_threshold(list(scores.values()), config.forget_ratio)
    reverted = {}
    for (b, name), qualified in zip(keys, W_P):
        idx = select_at_or_above(scores[qualified], threshold)
        if flipped:  # a budget above the number of flipped codes reverts them all and nothing else
            idx = idx[flipped[qualified].view(-1)[idx]]
        module = modules[qualified]
        W_target = W_ft[qualified].clone()
        W_target.view(-1)[idx] = W_P[qualified].reshape(-1)[idx] if config.forget_fill == "public" else 0.0
        calibrate.set_linear_weight(module, W_target.to(module.weight.dtype))
        reverted[(b, name)] = (W_ft[qualified], idx)
    return reverted


def _base_only_layer(base: QuantizedWeight, bias: torch.Tensor | None, like: nn.Module) -> OrthoLinear:
    layer = OrthoLinear.from_parts(base, OrthoCSR.empty(tuple(base.codes.shape)), bias)
    layer.alpha_state = AlphaState(default=0.0)
    return layer.to(_module_device(like))


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")

