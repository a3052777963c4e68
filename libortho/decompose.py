"""`decompose(model, tokenizer, calibration_text, config)`: split every chosen linear layer of a
causal LM into an INT base stream and a sparse ortho stream, decoder block by decoder block.

Block i is calibrated on the output of the already-quantized blocks < i at alpha = 0, so the base
stream is fitted to its own inputs: it has to be a self-consistent model on its own.

The driver's stages, in the order they run, each returning its result, with what each reads,
keeps and frees. The fits run where the model's decoder blocks are (CPU or CUDA: Hessians, W*, GPTQ
and the ortho fits alike); what a stage keeps across blocks is kept in host memory.

  plan      (plan.py) reads the tokenizer, the calibration text, the forget texts and the public model P.
            Keeps the token batches, the model's decoder blocks and their target linears, and a
            handle on P's decoder blocks (forget objective only): each W_P is read, as a float32
            copy, only while its layer is fitted. forget_target="public_activations": P itself, whose own
            blocks carry P's hidden states of the forget texts beside the base's (public_target.py).
  quantize  block by block. Captures block 0's inputs once (public, and private for the forget
            texts) and carries them from block to block. Per block: accumulates H_pub (and
            H_priv), fits each layer's base (forget.py's W* under H', GPTQ) and replaces the
            nn.Linear by a base-only OrthoLinear and points the plan at it, so the fine-tuned
            weight of that layer is freed with the module. H_pub, and H_priv of the default
            target, are read once per block through the fine-tuned block. forget_target=
            "public_activations": H_priv and C are collected per input group instead, just before
            the group is fitted, through the groups fitted before it (o_proj's inputs through the
            base's q/k/v, ...), and P's hidden states move past P's block once the block is done.
            lowrank_target="propagated" (propagated.py) carries the fine-tune's and alpha 1's hidden states too,
            and reads each input group's H₁ and C through the block at alpha 1. Keeps, per layer, the LayerParts (the
            base codes, the dense float32 residual R = W_ft - W_base, the curvature H the sieve
            uses, the bias). Each Hessian, and what is derived from it (H', the Cholesky factors,
            the sieve's curvature), is freed once the last layer reading it is fitted (curvatures.py),
            the block's fine-tuned weights and dense weight caches before the next block.
  finish    when each layer's ortho stream depends on that layer alone (`layer_local`: per-layer
            ranks with no sparse part, or a per-layer sparse budget), quantize fits it as the layer's
            base is done and frees that layer's R, H and edit at once; once the block is done the
            parts also let go of the unpacked codes (the model's base-only layer holds them packed,
            and install builds on it): the parts keep only the bias and the ortho stream.
  sieve     otherwise, reads every layer's R and H (a global budget compares scores across all
            layers: they are recomputed per pass rather than held) and returns the ortho stream per
            layer. R and H stay in the parts: one base can be sieved several ways.
  (work)    with a work folder (`decompose(..., work_dir=...)`, the CLI always), quantize saves each
            finished block there and a later call with the same inputs reads the blocks done back
            instead of fitting them again (workfolder.py). The parts are then a SpilledParts: a staged
            layer's R, H, edit and codes leave memory once its block is saved, and the sieve and install
            read them back from the block's file one layer at a time, so host memory holds no more than
            one layer's residual at any point.
  install   reads the parts and the ortho streams, builds the final OrthoLinear layers and the
            model's OrthoState (config, provenance, the alpha switch at 0). The caller drops
            the parts afterwards; `decompose` does so by returning only the stats.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, calibrate
from .config import OrthoConfig
from .curvatures import BlockCurvatures
from .plan import DecompositionPlan, LayerKey, plan_decomposition, plan_shapes
from .propagated import PropagatedInputs
from .public_target import PublicActivations, input_groups
from .hf_model import decoder_blocks, linear_weight, module_device, replace_submodule
from .layer import OrthoLinear, ortho_layers
from .memory import release_freed_memory
from .ortho_split import LayerFinisher, OrthoParts, split_model
from .state import OrthoState, attach, state_of
from .switch import AlphaState
from .workfolder import SpilledParts, WorkFolder, fingerprint
from .quantize import QuantizedWeight, gptq, rtn
from .shards import ShardedCheckpoint
from .streaming import BlockLoader
from .csr import OrthoCSR, csr_from_flat_indices
from .sieve import (
    global_threshold,
    impact,
    refit_values,
    select_at_or_above,
    select_layer,
)

@dataclass
class DecompositionStats:
    seconds: float = 0.0
    n_layers: int = 0
    n_weights: int = 0
    n_ortho: int = 0
    n_private_tokens: int = 0  # forget-text tokens whose inputs shaped H_priv
    layer_output_error: dict[str, float] = field(default_factory=dict)  # ||W_ft X - W_base X||² / ||W_ft X||², public X
    # ||W_P X - W_base X||² / ||W_P X||² on the forget texts' inputs: how closely the base acts like P there
    layer_private_error: dict[str, float] = field(default_factory=dict)
    ortho_bytes: dict = field(default_factory=dict)  # with an ortho_budget: the split (ortho_split.split_budget)
    device: str = "cpu"  # where the fits ran: the device of the model's decoder blocks
    stage_seconds: dict = field(default_factory=dict)  # plan, quantize (with each layer's finish), sieve, install
    peak_device_bytes: int = 0  # CUDA: the most memory torch held at once during the decomposition (0 on the CPU)

    def to_dict(self) -> dict:
        return asdict(self)


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
    """One decomposed layer before the sieve: base stream, residual R = W_ft - W_base [out, in],
    the curvature H [in, in] the sieve scores and refits under (H_pub, or H_pub + lam_s·H_priv;
    None without calibration) and bias. A layer finished in place (`layer_local`) has its `ortho`
    stream and no longer R, H or edit."""

    base: QuantizedWeight | None  # None once a finished layer's codes live only in the model (`_drop_codes`)
    R: torch.Tensor | None
    H: torch.Tensor | None
    bias: torch.Tensor | None
    edit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (W_ft − W*, H_priv, H'): fit (a) only
    ortho: OrthoCSR | OrthoParts | None = None


FinishLayer = Callable[[LayerKey, LayerParts], "OrthoCSR | OrthoParts"]


def layer_local(config: OrthoConfig) -> bool:
    """Whether every layer's ortho stream depends on that layer alone, so that it can be fitted as soon
    as the layer's base is: per-layer ranks and no sparse part, or a sparse-only per-layer budget."""
    if config.ortho_budget is not None:
        return config.lowrank_alloc == "layer" and config.lowrank_share == 1.0
    return config.budget in ("layer", "threshold")


def quantize_model(
    model: nn.Module, plan: DecompositionPlan, config: OrthoConfig, progress: bool = True,
    finish: FinishLayer | None = None, work: tuple[WorkFolder, int] | None = None,
) -> tuple[dict[LayerKey, LayerParts], DecompositionStats]:
    """Quantize the base stream block by block; chosen linears become base-only OrthoLinear in place.

    Per block: collect H_pub on the calibration batches (and H_priv on the forget texts: per input
    group, through the groups already fitted, with forget_target="public_activations"), fit each
    layer's base to its target (plain GPTQ of W_ft, or the forget objective's W* under H'), then
    run both sets of inputs through the quantized block for the next one. Returns every layer's
    parts, keyed by (block index, name inside the block), so one base can be sieved in several ways;
    with `finish`, each layer's ortho stream is fitted as its base is done and its R, H and edit freed.
    `work` = (work folder, blocks already done): each finished block is saved there, and the blocks
    already done are read back instead of fitted again (workfolder.py).
    """
    start = time.perf_counter()
    stats = DecompositionStats()
    model.eval()
    needs_h = config.method == "gptq" or config.score != "magnitude" or config.ortho_refit or config.forgets
    blocks = plan.blocks
    public = calibrate.capture_block_inputs(model, plan.public_batches, blocks[0])
    private = calibrate.capture_block_inputs(model, plan.private_batches, blocks[0]) if plan.private_batches else None
    # sieve_private_inputs="finetuned": the private texts also go through the fine-tuned blocks (block 0's inputs, the
    # embeddings, are the same for both), each block run before its layers are replaced
    private_ft = None
    if private is not None and config.sieve_private_inputs == "finetuned":
        private_ft = calibrate.BlockInputs(list(private.hidden), private.masks, private.args, private.kwargs)
    # lowrank_target="propagated": L fitted on the inputs alpha 1 gives each layer; its streams carry the private texts
    propagated = None
    if config.lowrank_target == "propagated":
        propagated = PropagatedInputs(public, private_ft, config.sieve_private_weight, config.propagated_ridge)
        private_ft = None
    stats.n_private_tokens = sum(int(mask.sum()) for _, mask in plan.private_batches)
    p_acts = PublicActivations(plan.public_model, plan.private_batches) if plan.public_model is not None else None

    folder, done = work if work is not None else (None, 0)
    # With a work folder, a staged layer's R and H (float32, as large as its weights) are read back from there
    # when the sieve needs them, instead of every layer's being held until the end.
    parts: dict[LayerKey, LayerParts] = {} if folder is None else SpilledParts(folder, config)
    if done:
        _restore(folder, done, plan, config, parts, stats, public, private, finish, p_acts, private_ft, propagated)
    # Streamed: the embeddings go back to disk until the blocks are done (no block's forward reads them).
    with plan.block_loader.embeddings_on_disk() if plan.block_loader is not None else nullcontext():
        for b in tqdm(range(done, len(blocks)), desc="decompose", unit="block", disable=not progress, initial=done, total=len(blocks)):
            _fit_block(b, plan, config, needs_h, public, private, parts, stats, finish, p_acts, private_ft, propagated)
            block, targets = blocks[b], plan.targets[b]
            # What block b+1 sees: the base stream's output.
            public.hidden = calibrate.run_block(block, public)
            if private is not None:
                private.hidden = calibrate.run_block(block, private)
            for module in block.modules():
                if isinstance(module, OrthoLinear):
                    module.clear_cache()  # a dense copy of every base would double the memory
            if folder is not None:
                folder.save_block(b, {name: parts[(b, name)] for name in targets}, _carry(public, private, finish, p_acts, private_ft, propagated),
                                  stats.to_dict())
                parts.spill(b, targets)
            if finish is not None:
                _drop_codes(parts, b, targets)
            release_freed_memory()  # the block's fits leave freed heap pages that glibc would otherwise keep
    stats.n_layers = len(parts)
    stats.seconds = time.perf_counter() - start
    return parts, stats


def _fit_block(b: int, plan: DecompositionPlan, config: OrthoConfig, needs_h: bool, public: calibrate.BlockInputs,
               private: calibrate.BlockInputs | None, parts: dict, stats: DecompositionStats, finish: FinishLayer | None,
               p_acts: PublicActivations | None = None, private_ft: calibrate.BlockInputs | None = None,
               propagated: PropagatedInputs | None = None) -> None:
    """Fit block b's targets one after the other, each replaced by a base-only OrthoLinear and its parts put
    in `parts`. Everything the fits held (the block's fine-tuned weights, its Hessians and what is derived
    from them) is freed by the time this returns, each Hessian as soon as the last layer reading it is done.
    `p_acts` (forget_target="public_activations"): H_priv and C are collected per input group, through the
    groups already fitted (public_target.py), and P's hidden states are moved past P's block b. `private_ft`
    (sieve_private_inputs="finetuned"): the sieve's H_priv is collected on it, and it is moved past the block
    while the block is still the fine-tune's. `propagated` (lowrank_target="propagated"): the fine-tune's inputs
    of every target are captured while the block is the fine-tune's, then per input group alpha 1's, through the
    block with the groups before it at base + L; each layer's L is fitted to its target, and the alpha-1 streams are
    moved past the block at alpha 1 once every layer has its L."""
    block = plan.blocks[b]
    if plan.block_loader is not None:
        plan.block_loader.load(b)
    targets = plan.targets[b]
    if propagated is not None:
        propagated.capture_finetuned(block, targets)
    H_sieve_priv = None
    if private_ft is not None and needs_h:
        H_sieve_priv = _block_hessians(block, targets, private_ft)
        private_ft.hidden = calibrate.run_block(block, private_ft)
    H_pub = _block_hessians(block, targets, public) if needs_h else {}
    sequential = p_acts is not None
    H_priv = _block_hessians(block, targets, private) if needs_h and private is not None and not sequential else {}
    curvatures = BlockCurvatures(H_pub, H_priv, config, {} if sequential else None, H_sieve_priv)
    groups = input_groups(H_pub) if sequential or propagated is not None else [list(targets)]
    with_lowrank: dict[str, OrthoLinear] = {}  # propagated: the layers fitted so far, base + L, as alpha 1 runs them
    on_host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    # The forwards' and each fit's freed activations would otherwise stay in the heap under the next fit.
    release_freed_memory(collect=False)
    for group in groups:
        if sequential:  # through the block as it is now: the groups before are base-only
            curvatures.add_private(*p_acts.private_curvatures(b, block, group, private))
        if propagated is not None:  # through the block at alpha 1: the groups before are base + L
            propagated.collect(block, group, with_lowrank)
        for name in group:
            parts[(b, name)] = _fit_layer((b, name), targets[name], curvatures, plan, config, stats, finish, on_host,
                                          propagated)
            # The plan points at the base-only layer: nothing holds this layer's fine-tuned weight any more.
            targets[name] = block.get_submodule(name)
            if propagated is not None:
                with_lowrank[name] = _with_lowrank(targets[name], parts[(b, name)].ortho)
            release_freed_memory(collect=False)
    if sequential:
        p_acts.advance(b)
    if propagated is not None:
        propagated.advance(block, with_lowrank)


def _fit_layer(key: LayerKey, module: nn.Module, curvatures: BlockCurvatures, plan: DecompositionPlan, config: OrthoConfig,
               stats: DecompositionStats, finish: FinishLayer | None, on_host: dict,
               propagated: PropagatedInputs | None = None) -> LayerParts:
    """One layer: its base, its output errors, its residual R [out, in] and, with `finish`, its ortho stream;
    the layer becomes base-only in its block. Returns its parts, in host memory. With `propagated`, R and H are
    what L is fitted to and under on alpha 1's inputs (propagated.py)."""
    b, name = key
    W = linear_weight(module).float()
    W_P = plan.public_weights.get(key, W.device)
    stats.n_weights += W.numel()
    base, edit = _fitted_base(name, W, W_P, curvatures, config) if name in curvatures else (rtn(W, config.quant_spec), None)
    W_base = base.dequantize()
    if name in curvatures.pub:
        stats.layer_output_error[f"{b}.{name}"] = relative_output_error(W, W_base, curvatures.pub[name])
    if name in curvatures.priv and W_P is not None:
        stats.layer_private_error[f"{b}.{name}"] = relative_output_error(W_P, W_base, curvatures.priv[name])
    H_sieve = curvatures.done(name) if name in curvatures else None
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float()
    R = W - W_base
    if propagated is not None:
        R, H_sieve = propagated.residual(name, W, W_base)
    part = LayerParts(base, R.contiguous(), H_sieve, bias, edit)
    del W, W_P, W_base, R  # not read again: freed before the ortho fit's own working set
    if finish is not None:
        part = LayerParts(base, None, None, bias, ortho=finish(key, part))
    replace_submodule(plan.blocks[b], name, _base_only_layer(base, bias, module))
    return _on_cpu(part, on_host)


def _fitted_base(name: str, W: torch.Tensor, W_P: torch.Tensor | None, curvatures: BlockCurvatures,
                 config: OrthoConfig) -> tuple[QuantizedWeight, tuple | None]:
    """(the base of layer `name`: GPTQ of its target W* under H', the forget edit (W − W*, H_priv, H') for
    fit (a) or None). W* and H' are this call's: freed on return unless the edit keeps them."""
    fit = curvatures.target(name, W, W_P)
    base = quantize_base(fit.W, fit.H, config, curvatures.factor(name, fit.H))
    edit = None
    if config.ortho_budget is not None and config.lowrank_fit == "edit" and name in curvatures.priv:
        edit = (W - fit.W, curvatures.priv[name], fit.H)
    return base, edit


def _carry(public: calibrate.BlockInputs, private: calibrate.BlockInputs | None, finish, p_acts=None,
           private_ft: calibrate.BlockInputs | None = None, propagated: PropagatedInputs | None = None) -> dict[str, torch.Tensor]:
    """What the next block needs that is not in the finished blocks: its inputs (and P's, and the fine-tune's
    private ones), and the fits' random state."""
    carry = {f"public.{i}": h for i, h in enumerate(public.hidden)}
    carry.update({f"private.{i}": h for i, h in enumerate(private.hidden if private is not None else [])})
    carry.update({f"private_ft.{i}": h for i, h in enumerate(private_ft.hidden if private_ft is not None else [])})
    carry.update({f"public_target.{i}": h for i, h in enumerate(p_acts.inputs.hidden if p_acts is not None else [])})
    if propagated is not None:
        carry.update({f"propagated.{k}": h for k, h in propagated.carry().items()})
    if getattr(finish, "generator", None) is not None:
        carry["generator"] = finish.generator.get_state()
    return carry


def _restore(folder: WorkFolder, done: int, plan: DecompositionPlan, config: OrthoConfig, parts: dict, stats: DecompositionStats,
             public: calibrate.BlockInputs, private: calibrate.BlockInputs | None, finish, p_acts=None,
             private_ft: calibrate.BlockInputs | None = None, propagated: PropagatedInputs | None = None) -> None:
    """Put blocks < done back as a run that fitted them would have left them: their layers as base-only
    OrthoLinear in the model, their parts, the stats, and the inputs and random state of block `done`."""
    for b in range(done):
        if plan.block_loader is not None:
            plan.block_loader.load(b)  # the layers outside the targets (norms), and the targets' devices
        for name, part in folder.load_block(b, config).items():
            parts[(b, name)] = part
            replace_submodule(plan.blocks[b], name, _base_only_layer(part.base, part.bias, plan.targets[b][name]))
        plan.targets[b] = {name: plan.blocks[b].get_submodule(name) for name in plan.targets[b]}
        parts.spill(b, plan.targets[b])
        if finish is not None:
            _drop_codes(parts, b, plan.targets[b])
    saved = folder.stats()
    stats.n_weights = saved["n_weights"]
    stats.layer_output_error.update(saved["layer_output_error"])
    stats.layer_private_error.update(saved["layer_private_error"])
    carry = folder.load_carry()
    public.hidden = [carry[f"public.{i}"].to(h.device) for i, h in enumerate(public.hidden)]
    if private is not None:
        private.hidden = [carry[f"private.{i}"].to(h.device) for i, h in enumerate(private.hidden)]
    if p_acts is not None:
        p_acts.inputs.hidden = [carry[f"public_target.{i}"].to(h.device) for i, h in enumerate(p_acts.inputs.hidden)]
    if private_ft is not None:
        private_ft.hidden = [carry[f"private_ft.{i}"].to(h.device) for i, h in enumerate(private_ft.hidden)]
    if propagated is not None:
        propagated.restore({k.removeprefix("propagated."): h for k, h in carry.items() if k.startswith("propagated.")})
    if "generator" in carry:
        finish.generator.set_state(carry["generator"])


def _drop_codes(parts: dict, b: int, names) -> None:
    """Block b's layers are finished: the model's base-only layers hold their codes, packed, so the parts let go
    of the unpacked copy (1 byte per weight on the host); `install` then builds on those layers."""
    for name in names:
        parts[(b, name)].base = None


def _block_hessians(block: nn.Module, targets: dict[str, nn.Module], inputs: calibrate.BlockInputs) -> dict[str, torch.Tensor]:
    """H = 2XᵀX/n [in, in] of every target's input over `inputs` (padding excluded); layers that
    read the same input get the same tensor object."""
    collector = calibrate.HessianCollector(targets)
    try:
        calibrate.run_block(block, inputs, collector)
    finally:
        collector.close()
    return {name: collector.hessian(name) for name in targets}


def _on_cpu(part: LayerParts, moved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> LayerParts:
    """The part as the later stages keep it: in host memory, whichever device fitted it (a no-op on the CPU).
    `moved`: the block's tensors already copied, by id, so that layers which shared an H on the device (q/k/v)
    share one copy on the host."""

    def cpu(t):
        if t is None or t.device.type == "cpu":
            return t
        if id(t) not in moved or moved[id(t)][0] is not t:  # an id is reused once its tensor is freed
            moved[id(t)] = (t, t.cpu())
        return moved[id(t)][1]

    base = QuantizedWeight(cpu(part.base.codes), cpu(part.base.scales), cpu(part.base.zeros), part.base.spec)
    edit = None if part.edit is None else tuple(cpu(t) for t in part.edit)
    ortho = part.ortho
    if isinstance(ortho, OrthoCSR):
        ortho = OrthoCSR(cpu(ortho.crow), cpu(ortho.col), cpu(ortho.val), ortho.shape)
    elif isinstance(ortho, OrthoParts):
        s, low = ortho.sparse, ortho.lowrank
        ortho = OrthoParts(OrthoCSR(cpu(s.crow), cpu(s.col), cpu(s.val), s.shape), type(low)(cpu(low.B), cpu(low.A), low.codes))
    return LayerParts(base, cpu(part.R), cpu(part.H), cpu(part.bias), edit, ortho)


def sieve_model(parts: dict[LayerKey, LayerParts], config: OrthoConfig) -> dict[LayerKey, OrthoCSR]:
    """Choose each layer's ortho entries (global or per-layer budget, or threshold) and their values."""
    spec = config.sieve_spec
    scores = _LayerScores(parts, spec)
    threshold = global_threshold(scores, spec.ortho_ratio) if spec.budget == "global" else None
    return {key: sieve_layer(p, config, threshold, scores[key]) for key, p in parts.items()}


def sieve_layer(p: LayerParts, config: OrthoConfig, threshold: float | None = None,
                score: torch.Tensor | None = None) -> OrthoCSR:
    """One layer's ortho entries: those scoring at or above a global `threshold`, else the layer's own
    budget (per-layer ratio or threshold); values refit under p.H when config.ortho_refit."""
    ortho_dtype = getattr(torch, config.ortho_dtype)
    spec = config.sieve_spec
    s = impact(p.R, p.H, spec.score, spec.damp) if score is None else score
    idx = select_at_or_above(s, threshold) if threshold is not None else select_layer(s, spec)
    del s
    csr = csr_from_flat_indices(idx, p.R, torch.float32 if config.ortho_refit else ortho_dtype)
    if config.ortho_refit and p.H is not None:
        csr = refit_values(csr, p.R, p.H, spec.damp)
    return OrthoCSR(csr.crow, csr.col, csr.val.to(ortho_dtype), csr.shape)


class _LayerScores:
    """Every layer's impact scores, recomputed on each pass rather than held all at once
    (they are as large as the model's weights)."""

    def __init__(self, parts: dict[LayerKey, LayerParts], spec) -> None:
        self.parts, self.spec = parts, spec

    def __getitem__(self, key: LayerKey) -> torch.Tensor:
        p = self.parts[key]
        return impact(p.R, p.H, self.spec.score, self.spec.damp)

    def __iter__(self):
        return (self[key] for key in self.parts)


def install(
    model: nn.Module,
    parts: dict[tuple[int, str], LayerParts],
    orthos: dict[tuple[int, str], OrthoCSR | OrthoParts],
    config: OrthoConfig,
    alpha: float = 0.0,
) -> int:
    """Put the final OrthoLinear layers into `model` sharing one alpha switch; returns the ortho nnz.
    orthos: each layer's sparse part, or both parts (ortho_split.OrthoParts).

    The switch starts at `alpha` = 0 (fail closed): the ortho stream only joins when asked for."""
    _, blocks = decoder_blocks(model)
    n_ortho = 0
    for (b, name), ortho in orthos.items():
        sparse, low = (ortho.sparse, ortho.lowrank) if isinstance(ortho, OrthoParts) else (ortho, None)
        lowrank = None if low is None or low.rank == 0 else low
        current = blocks[b].get_submodule(name)
        if isinstance(current, OrthoLinear):
            # the base-only layer quantize left (or an earlier install's layer) holds these parts' codes, packed:
            # built on it, no layer's unpacked codes are read and no second copy of the base is made
            layer = current.with_ortho(sparse, lowrank)
        else:
            p = parts[(b, name)]
            layer = OrthoLinear.from_parts(p.base, sparse, p.bias, lowrank).to(module_device(blocks[b]))
        replace_submodule(blocks[b], name, layer)
        n_ortho += sparse.nnz
    attach(model, OrthoState(AlphaState(default=alpha), config, provenance=dict(libortho_version=__version__)),
           ortho_layers(model))
    return n_ortho


def decompose(
    model: nn.Module,
    tokenizer,
    calibration_text: str,
    config: OrthoConfig | None = None,
    progress: bool = True,
    public_model: nn.Module | ShardedCheckpoint | None = None,
    forget_texts: list[str] | None = None,
    work_dir: str | Path | None = None,
    block_loader: BlockLoader | None = None,
) -> DecompositionStats:
    """Replace the linear layers of `model`'s decoder blocks by OrthoLinear layers, in place.

    calibration_text: public text only (never the secrets you will test for).
    With config.forget_source set (see forget.py), `public_model` is the public checkpoint P the
    model was fine-tuned from (a model, or its folder as a `ShardedCheckpoint`, read one tensor at a time), and `forget_texts` the texts whose inputs the base must treat like
    P (the records to hide, or look-alikes of them; none for forget_source="free").
    `block_loader`: `model` came from streaming.open_streamed, its decoder blocks still on disk; each is
    read when the decomposition reaches it. `work_dir`: a folder where each finished block is saved; a call with the same inputs and config
    continues after the last block saved there (workfolder.py), and the caller removes it when done.
    Returns timing and per-layer statistics; the model's alpha starts at 0 (ask for more with
    ``libortho.alpha`` or ``libortho.set_alpha``).
    """
    config = config or OrthoConfig()
    start = time.perf_counter()
    device = block_loader.device if block_loader is not None else module_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plan = plan_decomposition(model, tokenizer, calibration_text, config, public_model, forget_texts, block_loader)
    plan_seconds = time.perf_counter() - start
    work = None
    if work_dir is not None:
        folder = WorkFolder(work_dir)
        key = fingerprint(config, calibration_text, forget_texts, [block_loader or model, public_model])
        work = (folder, folder.start(key, len(plan.blocks)))
    if layer_local(config):
        finisher = LayerFinisher(config, plan_shapes(plan), sieve_layer)
        parts, stats = quantize_model(model, plan, config, progress, finish=finisher, work=work)
        sieve_start = time.perf_counter()
        orthos = {key: p.ortho for key, p in parts.items()}
        stats.ortho_bytes = finisher.bytes(orthos) if config.ortho_budget is not None else {}
    else:
        parts, stats = quantize_model(model, plan, config, progress, work=work)
        sieve_start = time.perf_counter()
        if config.ortho_budget is None:
            orthos = sieve_model(parts, config)
        else:
            orthos, stats.ortho_bytes = split_model(parts, config, sieve_model)
    release_freed_memory()  # each layer's scores and residual, read and freed by the sieve
    install_start = time.perf_counter()
    stats.n_ortho = install(model, parts, orthos, config)
    del parts, orthos
    release_freed_memory()  # the replaced base-only layers and each layer's unpacked codes
    end = time.perf_counter()
    stats.stage_seconds = dict(plan=plan_seconds, quantize=stats.seconds, sieve=install_start - sieve_start,
                               install=end - install_start)
    stats.seconds = end - start
    stats.device = str(device)
    if device.type == "cuda":
        stats.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
    state_of(model).stats = stats.to_dict()
    return stats


def _base_only_layer(base: QuantizedWeight, bias: torch.Tensor | None, like: nn.Module) -> OrthoLinear:
    layer = OrthoLinear.from_parts(base, OrthoCSR.empty(tuple(base.codes.shape)), bias)
    layer.alpha_state = AlphaState(default=0.0)
    return layer.to(module_device(like))


def _with_lowrank(base_only: OrthoLinear, ortho: OrthoParts) -> OrthoLinear:
    """The base-only layer with its fitted L (and empty S), as install builds it."""
    lowrank = None if ortho.lowrank is None or ortho.lowrank.rank == 0 else ortho.lowrank
    return base_only.with_ortho(ortho.sparse, lowrank)
