"""Every choice a decomposition makes, in one place: `OrthoConfig`, its enums and the named presets.

The command line, the demo and the experiment scripts read their defaults from here, so a
default is written once. Importing this module does not import torch (the CLI's --help stays fast).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

METHODS = ("gptq", "rtn")
# Sieve scores: |R| (the ablation), R²·H_jj (diagonal curvature), R²/[H⁻¹]_jj (OBS saliency).
SCORES = ("magnitude", "diag", "obs")
BUDGETS = ("global", "layer", "threshold")
ORTHO_DTYPES = ("float16", "bfloat16")  # torch dtype names
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
# Where the private inputs X_priv of the forget objective come from (forget.py):
#   none       plain GPTQ, no forget objective;
#   records    the texts the owner lists (the records to hide);
#   lookalikes texts of the same shape as the records, never trained (written or generated);
#   free       no texts: lam·H_priv is replaced by mu·mean(diag H_pub)·I, pulling the base toward P
#              wherever public text does not look.
FORGET_SOURCES = ("none", "records", "lookalikes", "free")
# What the forget texts' term asks of each layer (forget.py):
#   base_inputs        act like P's weight on the base's own inputs: lam·||(W_P - q) X_b||²;
#   public_activations act like P on P's own inputs of the same tokens: lam·||W_P X_P - q X_b||², X_P carried
#                      through P's own decoder blocks (P must be loaded as a model).
FORGET_TARGETS = ("base_inputs", "public_activations")
LOWRANK_FITS = ("svd", "edit", "random")
LOWRANK_ALLOCS = ("global", "layer")
SIEVE_PRIVATE_INPUTS = ("base", "finetuned")
# What each layer's low-rank part L is fitted to (propagated.py):
#   residual   R = W_ft - W_base, on one set of inputs per layer;
#   propagated the fine-tune's layer outputs, on the inputs alpha 1 gives the layer (through the blocks already
#              decomposed, each with its L), so that L also corrects the error the earlier blocks pass on.
LOWRANK_TARGETS = ("residual", "propagated")
LOWRANK_BITS = (16, 8, 4)  # 16: B and A stored in ortho_dtype; 8 / 4: as symmetric integer codes (lowrank.py)


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
    # The forget objective (forget.py): the base is GPTQ's projection of W* under H' = H_pub + lam·H_priv,
    # W* = the weight that acts like the fine-tune on public inputs and like P on the private ones.
    forget_source: str = "none"
    forget_lambda: float = 3.0  # lam relative to the Hessians' traces: lam_abs = lam · tr(H_pub) / tr(H_priv)
    forget_mu: float = 1.0  # forget_source="free": lam·H_priv -> mu · mean(diag H_pub) · I
    forget_target: str = "base_inputs"  # FORGET_TARGETS: W_P on the base's inputs, or P's own activations
    # The sieve and its refit run under H_pub + lam_s·H_priv (lam_s relative like forget_lambda), so
    # that alpha = 1 restores what the base dropped on the private inputs; 0 = public curvature only.
    sieve_private_weight: float = 0.0
    # Which private inputs that H_priv is collected on: "base", as they arrive through the blocks already
    # decomposed (alpha 0's inputs), or "finetuned", through the fine-tuned blocks (what alpha 1 restores)
    sieve_private_inputs: str = "base"
    # The ortho stream's budget in bytes, as a fraction of the base's bytes (ortho_split.py); when set
    # it wins over ortho_ratio and splits the bytes between the sparse part S and a low-rank part
    # L = B·A: lowrank_share of them to L, ranks in steps of lowrank_step, fitted by lowrank_fit
    # ("svd": H-weighted SVD of the residual, "edit": the forget edit in the eigenbasis of
    # (H_priv, H'), "random": the random-subspace control), before the sieve (lowrank_first) or after it.
    ortho_budget: float | None = None
    lowrank_share: float = 0.5
    lowrank_fit: str = "svd"
    lowrank_first: bool = True
    lowrank_step: int = 1
    lowrank_alloc: str = "layer"  # each layer the rank its share buys, or "global": by marginal gain per byte (docs/RESULTS.md)
    # L's storage: 16 = B and A in ortho_dtype; 8 or 4 = integer codes in groups of 64 (lowrank.code_factors),
    # so the same bytes buy about 1.9x / 3.6x the rank
    lowrank_bits: int = 16
    lowrank_target: str = "residual"  # LOWRANK_TARGETS
    # lowrank_target="propagated": the ridge of the drift correction's solve, relative to mean(diag H₁) (propagated.py)
    propagated_ridge: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _choose("method", self.method, METHODS)
        _choose("ortho_dtype", self.ortho_dtype, ORTHO_DTYPES)
        _choose("forget_source", self.forget_source, FORGET_SOURCES)
        _choose("forget_target", self.forget_target, FORGET_TARGETS)
        if self.forget_target != "base_inputs" and not self.needs_forget_texts:
            raise ValueError(
                f"forget_target={self.forget_target!r} runs P on the forget texts: set forget_source to 'records' "
                f"or 'lookalikes' (not {self.forget_source!r})"
            )
        if self.forget_lambda < 0 or self.forget_mu < 0 or self.sieve_private_weight < 0:
            raise ValueError(
                f"forget_lambda={self.forget_lambda}, forget_mu={self.forget_mu} and "
                f"sieve_private_weight={self.sieve_private_weight} must all be >= 0"
            )
        if self.sieve_private_weight > 0 and self.forget_source in ("none", "free"):
            raise ValueError("sieve_private_weight needs private texts: set forget_source to 'records' or 'lookalikes'")
        _choose("sieve_private_inputs", self.sieve_private_inputs, SIEVE_PRIVATE_INPUTS)
        if self.sieve_private_inputs != "base" and self.sieve_private_weight == 0:
            raise ValueError(f"sieve_private_inputs={self.sieve_private_inputs!r} chooses the inputs of the sieve's private "
                             "term: set sieve_private_weight above 0")
        _choose("lowrank_fit", self.lowrank_fit, LOWRANK_FITS)
        _choose("lowrank_alloc", self.lowrank_alloc, LOWRANK_ALLOCS)
        if self.ortho_budget is not None and not 0.0 <= self.ortho_budget < float("inf"):
            raise ValueError(f"ortho_budget={self.ortho_budget} is a fraction of the base's bytes (0.25 = 25 %), >= 0")
        if not 0.0 <= self.lowrank_share <= 1.0:
            raise ValueError(f"lowrank_share={self.lowrank_share} must lie in [0, 1] (the low-rank part's share of the bytes)")
        if self.lowrank_bits not in LOWRANK_BITS:
            raise ValueError(f"lowrank_bits={self.lowrank_bits} is not supported; choose one of {', '.join(map(str, LOWRANK_BITS))}")
        _choose("lowrank_target", self.lowrank_target, LOWRANK_TARGETS)
        if self.lowrank_target == "propagated":
            self._check_propagated()
        if self.lowrank_step < 1:
            raise ValueError(f"lowrank_step={self.lowrank_step} must be >= 1")
        if self.lowrank_fit == "edit" and self.forget_source not in ("records", "lookalikes"):
            raise ValueError("lowrank_fit='edit' fits the forget edit: set forget_source to 'records' or 'lookalikes'")
        if self.calib_tokens < 1 or self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("calib_tokens, seq_len and batch_size must be positive")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ValueError(f"include={self.include!r} is not a valid regular expression ({err})") from None
        self.quant_spec, self.sieve_spec  # validates both

    def _check_propagated(self) -> None:
        conflict = propagated_conflict(self.to_dict())
        if conflict is not None:
            raise ValueError(conflict)
        if not self.propagated_ridge > 0:
            raise ValueError(f"propagated_ridge={self.propagated_ridge} must be > 0 (relative to mean(diag H₁); 0.1 by default)")

    @property
    def quant_spec(self):
        """The base's QuantSpec (validates bits and group size)."""
        from .quantize import QuantSpec

        return QuantSpec(self.bits, self.group_size, self.symmetric)

    @property
    def sieve_spec(self):
        """The sieve's SieveSpec (validates score, budget, ratio and threshold)."""
        from .sieve import SieveSpec

        return SieveSpec(self.score, self.ortho_ratio, self.budget, self.threshold, self.damp)

    @property
    def forgets(self) -> bool:
        """Whether the base is fitted to the forget objective (and so needs the public model P)."""
        return self.forget_source != "none"

    @property
    def needs_forget_texts(self) -> bool:
        return self.forget_source in ("records", "lookalikes")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint_dict(self) -> dict:
        """to_dict() less the fields added later that still hold their default (ADDED_DEFAULTS): a config that
        does not use them hashes as before they existed, so an unfinished run started then still resumes."""
        fields = self.to_dict()
        for name, default in ADDED_DEFAULTS.items():
            if fields.get(name) == default:
                del fields[name]
        return fields


# Fields added after work folders were fingerprinted, with their defaults (see fingerprint_dict). An artifact's
# manifest written before a field existed loads with its default (OrthoConfig(**manifest["config"])).
ADDED_DEFAULTS = {"forget_target": "base_inputs", "lowrank_bits": 16, "sieve_private_inputs": "base",
                  "lowrank_target": "residual", "propagated_ridge": 0.1}


def _choose(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not known; choose one of {', '.join(choices)}")


# Named presets, as changes to OrthoConfig's defaults (docs/RESULTS.md has the measurements).
# "quality": the plain decomposition (no forget objective): the defaults themselves.
# "privacy": GPTQ INT4 g64 fitted by the forget objective on the given forget texts; its ortho stream
# is the low-rank part alone, 25 % of the base's bytes, stored as 4-bit codes (~3.6x the rank of fp16
# factors), fitted to the fine-tune's layer outputs on the inputs alpha 1 gives each layer (propagated.py),
# public calibration text plus 3x the forget texts (lam_s relative to the traces) as the fine-tuned blocks pass
# them on, so that alpha 1 gives back what the edit took from the private inputs where alpha 1 meets them
# without spending most of L's fit on them (lam_s 30 cost about 0.2 perplexity at alpha 1; lam_s 1 fell
# under 90 % of FP's k = 4 exposure: docs/lowrank_codes/README.md § 8).
PRESETS: dict[str, dict] = {
    "quality": dict(),
    "privacy": dict(group_size=64, ortho_ratio=0.02, ortho_budget=0.25, lowrank_share=1.0, lowrank_bits=4,
                    sieve_private_weight=3.0, sieve_private_inputs="finetuned", lowrank_target="propagated"),
}
# Preset fields that only apply with forget texts: dropped, unless given, when the source has none.
NEEDS_FORGET_TEXTS = ("sieve_private_weight", "sieve_private_inputs")


def preset(name: str, **overrides) -> OrthoConfig:
    """An OrthoConfig from a named preset, with any field overridden.

    A sparse-only budget given as `ortho_ratio` (without `ortho_budget`) replaces the preset's byte
    budget: the caller asked for entries, not bytes. The preset's lowrank_target="propagated" fits a
    layer-local L only; overrides that ask for another ortho stream (a sparse part, global ranks, another
    fit) or for the forget texts' term on the base's inputs get the residual target, unless they ask for
    propagated themselves (then the config refuses)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not known; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if "ortho_ratio" in overrides and "ortho_budget" not in overrides:
        fields.pop("ortho_budget", None)
    if overrides.get("forget_source", OrthoConfig.forget_source) not in ("records", "lookalikes"):
        for field in NEEDS_FORGET_TEXTS:
            fields.pop(field, None)
    if "lowrank_target" not in overrides and propagated_conflict({**fields, **overrides}) is not None:
        fields.pop("lowrank_target", None)
    return OrthoConfig(**{**fields, **overrides})


def propagated_conflict(fields: dict) -> str | None:
    """Why these OrthoConfig fields (missing ones at their defaults) cannot take lowrank_target="propagated", or None.
    It fits each layer's L as soon as its base is done, from the inputs alpha 1 gives it: a layer-local low-rank
    stream fitted by the weighted SVD, with the forget texts' term (if any) on the fine-tune's inputs."""
    get = lambda name: fields.get(name, OrthoConfig.__dataclass_fields__[name].default)  # noqa: E731
    if get("ortho_budget") is None or get("lowrank_share") != 1.0 or get("lowrank_alloc") != "layer":
        return ("lowrank_target='propagated' fits each layer's L before the next block runs: set "
                "ortho_budget, lowrank_share=1 and lowrank_alloc='layer' (the privacy preset does)")
    if get("lowrank_fit") != "svd":
        return f"lowrank_target='propagated' fits L by the weighted SVD: set lowrank_fit='svd', not {get('lowrank_fit')!r}"
    if get("sieve_private_weight") > 0 and get("sieve_private_inputs") != "finetuned":
        return ("lowrank_target='propagated' weighs the fine-tune's outputs on the forget texts too: set "
                "sieve_private_inputs='finetuned' (or sieve_private_weight=0)")
    return None
