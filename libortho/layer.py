"""`OrthoLinear`: a drop-in for nn.Linear computing Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + b.

Alpha is not a global: every decomposed model owns one `AlphaState` (libortho/switch.py),
shared by its layers, which says how alpha is chosen for each forward pass.
"""
from __future__ import annotations

import torch
from torch import nn

from .lowrank import LOWRANK_GROUP, LowRank, factors_from_codes
from .packing import dequantize_packed, n_groups, pack, packed_bytes
from .quantize import QuantizedWeight, QuantSpec
from .csr import OrthoCSR
from .switch import AlphaState, AlphaValue


class OrthoLinear(nn.Module):
    """Dual-stream linear layer, Y = X·W_baseᵀ + alpha·X·(S + B·A)ᵀ + b. Buffers follow docs/DESIGN.md:
    packed codes and fp16 scales/zeros (the base), the ortho stream's sparse part S (CSR:
    ortho_crow, ortho_col, ortho_val) and low-rank part L = B·A (ortho_B [out, r], ortho_A
    [r, in], r = ortho_rank, 0 for none). With `lowrank_bits` 8 or 4, L is held as its integer codes
    instead (lowrank.code_factors): ortho_Aq [r, packed in] and ortho_Btq [r, packed out] (uint8, packed
    as the base's codes) with fp16 scales and zeros per LOWRANK_GROUP values (ortho_Aq_scales, ...),
    ortho_A and ortho_B then empty; the kernels see rank 0 and the layer adds L itself.
    `kernel_layout` is the fused kernels' view of the buffers, owned here: built on the first CUDA
    call and dropped whenever the buffers move."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        bias: bool = False,
        ortho_nnz: int = 0,
        ortho_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        ortho_rank: int = 0,
        lowrank_bits: int = 16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = QuantSpec(bits, group_size, symmetric)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        G = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_bytes(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.float16))
        self.register_buffer("ortho_crow", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("ortho_col", torch.zeros(ortho_nnz, dtype=torch.int32))
        self.register_buffer("ortho_val", torch.zeros(ortho_nnz, dtype=ortho_dtype))
        self.lowrank_bits = lowrank_bits
        float_rank = ortho_rank if lowrank_bits == 16 else 0
        self.register_buffer("ortho_A", torch.zeros(float_rank, in_features, dtype=ortho_dtype))
        self.register_buffer("ortho_B", torch.zeros(out_features, float_rank, dtype=ortho_dtype))
        if lowrank_bits != 16:
            for name, n in (("ortho_Aq", in_features), ("ortho_Btq", out_features)):
                self.register_buffer(name, torch.zeros(ortho_rank, packed_bytes(n, lowrank_bits), dtype=torch.uint8))
                for part in ("scales", "zeros"):
                    self.register_buffer(f"{name}_{part}", torch.zeros(ortho_rank, n_groups(n, LOWRANK_GROUP), dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        self.alpha_state = AlphaState()
        self._dense_cache: dict[tuple, torch.Tensor] = {}
        self.kernel_layout = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls, base: QuantizedWeight, ortho: OrthoCSR, bias: torch.Tensor | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | LowRank | None = None,
    ) -> "OrthoLinear":
        """lowrank: (B [out, r], A [r, in]), stored in the sparse part's dtype, or a LowRank (its codes when it
        has them); None = rank 0."""
        out_features, in_features = base.codes.shape
        layer = cls(
            in_features,
            out_features,
            base.spec.bits,
            base.spec.group_size,
            base.spec.symmetric,
            bias=bias is not None,
            ortho_nnz=ortho.nnz,
            ortho_dtype=ortho.val.dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            ortho_rank=_rank_of(lowrank), lowrank_bits=_bits_of(lowrank),
        )
        layer.qweight.copy_(pack(base.codes, base.spec.bits))
        layer.scales.copy_(base.scales)
        layer.zeros.copy_(base.zeros)
        layer._fill_ortho(ortho, lowrank)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def with_ortho(self, ortho: OrthoCSR, lowrank: tuple[torch.Tensor, torch.Tensor] | LowRank | None = None) -> "OrthoLinear":
        """A layer on this one's device with this one's base stream and bias (the same tensors, not copies) and
        the given ortho stream: what `from_parts` builds from the unpacked codes, without them."""
        layer = type(self)(
            self.in_features, self.out_features, self.bits, self.group_size, self.symmetric,
            bias=self.bias is not None, ortho_nnz=ortho.nnz, ortho_dtype=ortho.val.dtype,
            bias_dtype=self.bias.dtype if self.bias is not None else torch.float32,
            ortho_rank=_rank_of(lowrank), lowrank_bits=_bits_of(lowrank),
        )
        layer.qweight, layer.scales, layer.zeros, layer.bias = None, None, None, None  # replaced below: no copy
        layer._fill_ortho(ortho, lowrank)
        layer = layer.to(self.qweight.device)
        layer.qweight, layer.scales, layer.zeros, layer.bias = self.qweight, self.scales, self.zeros, self.bias
        return layer

    def _fill_ortho(self, ortho: OrthoCSR, lowrank: tuple[torch.Tensor, torch.Tensor] | LowRank | None) -> None:
        self.ortho_crow.copy_(ortho.crow)
        self.ortho_col.copy_(ortho.col)
        self.ortho_val.copy_(ortho.val)
        if isinstance(lowrank, LowRank) and lowrank.codes is not None:
            for name, q in (("ortho_Aq", lowrank.codes.A), ("ortho_Btq", lowrank.codes.Bt)):
                getattr(self, name).copy_(pack(q.codes, q.spec.bits))
                getattr(self, f"{name}_scales").copy_(q.scales)
                getattr(self, f"{name}_zeros").copy_(q.zeros)
        elif lowrank is not None:
            B, A = (lowrank.B, lowrank.A) if isinstance(lowrank, LowRank) else lowrank
            self.ortho_B.copy_(B)
            self.ortho_A.copy_(A)

    # ---- views of the two streams ---------------------------------------------------------
    @property
    def ortho_nnz(self) -> int:
        return int(self.ortho_col.numel())

    @property
    def ortho_rank(self) -> int:
        return int((self.ortho_A if self.lowrank_bits == 16 else self.ortho_Aq).shape[0])

    def lowrank_factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, r], A [r, in]) in `dtype`: the stored floats, or the codes' values."""
        if self.lowrank_bits == 16:
            return self.ortho_B.to(dtype), self.ortho_A.to(dtype)
        return factors_from_codes(lambda key: getattr(self, key), self.lowrank_bits, self.in_features, self.out_features, dtype)

    @property
    def has_ortho(self) -> bool:
        """Whether the ortho stream holds anything (sparse entries or a low-rank part)."""
        return self.ortho_nnz > 0 or self.ortho_rank > 0

    def base_weight(self) -> torch.Tensor:
        """Dequantized W_base [out, in] (float32)."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def ortho_weight(self) -> torch.Tensor:
        """Dense W_ortho = S + B·A [out, in] (float32)."""
        S = OrthoCSR(self.ortho_crow, self.ortho_col, self.ortho_val, (self.out_features, self.in_features)).to_dense()
        if self.ortho_rank == 0:
            return S
        B, A = self.lowrank_factors()
        return S + B @ A

    def _cached(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        key = (name, self.qweight.device, dtype)
        if key not in self._dense_cache:
            w = self.base_weight() if name == "base" else self.ortho_weight()
            self._dense_cache[key] = w.to(dtype)
        return self._dense_cache[key]

    def _merged(self, alpha: float, dtype: torch.dtype) -> torch.Tensor:
        """W_base + alpha·W_ortho [out, in] for one scalar alpha, so that a forward is one matmul.
        Only the latest alpha's copy is kept: a sweep over many alphas holds one at a time."""
        key = ("merged", float(alpha), self.qweight.device, dtype)
        if key not in self._dense_cache:
            for stale in [k for k in self._dense_cache if k[0] == "merged"]:
                del self._dense_cache[stale]
            self._dense_cache[key] = (self.base_weight() + float(alpha) * self.ortho_weight()).to(dtype)
        return self._dense_cache[key]

    def clear_cache(self) -> None:
        """Drop the dense weights derived from the buffers (rebuilt on the next forward)."""
        self._dense_cache = {}
        self.kernel_layout = None

    def _apply(self, fn, recurse=True):  # buffers moved or cast: derived caches are stale
        self.clear_cache()
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super().load_state_dict(*args, **kwargs)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha_state.get()
        # fp32 activations take the exact dense path below, so that measurements on a GPU
        # match the CPU's; the kernels serve half-precision inference.
        if x.is_cuda and self.bits == 4 and x.dtype != torch.float32:
            from . import kernels

            if kernels.available():
                from .kernels import lowrank_codes

                per_row = self._alpha_per_row(a, x)
                y = kernels.dual_stream_linear(x, self, per_row)
                if (lowrank_codes.ENABLED and lowrank_codes.supported(self)
                        and (isinstance(a, torch.Tensor) or float(a) != 0.0)):
                    # L read from its codes in the kernels: the device never holds it in fp16
                    lowrank_codes.add_lowrank_codes_(y.view(-1, self.out_features), x.reshape(-1, self.in_features),
                                                     self, per_row)
                    return y
                low = self._lowrank_term(x, a)
                return y if low is None else y + low
        return self.reference_forward(x, a)

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in `dtype` for the two thin GEMMs. Codes are turned into values once per device and dtype and
        kept (turning them on every call made a SmolLM2 decode step 2.4x slower on an H100): the device then
        holds L at the codes' rank in `dtype`, about 3.6x the codes' bytes at 4 bits (docs/lowrank_codes/).
        kernels.lowrank_codes reads the codes instead where it is switched on."""
        if self.lowrank_bits == 16:
            return self.lowrank_factors(dtype)
        key = ("lowrank", self.ortho_Aq.device, dtype)
        if key not in self._dense_cache:
            self._dense_cache[key] = self.lowrank_factors(dtype)
        return self._dense_cache[key]

    def _lowrank_term(self, x: torch.Tensor, alpha: AlphaValue) -> torch.Tensor | None:
        """alpha·(X·Aᵀ)·Bᵀ [..., out] in x's dtype: two thin GEMMs beside the fused kernel; None when
        there is nothing to add (rank 0, or a scalar alpha of 0). A per-row alpha scales each row
        without a host sync (a zero row adds exact zeros)."""
        if self.ortho_rank == 0 or (not isinstance(alpha, torch.Tensor) and float(alpha) == 0.0):
            return None
        B, A = self._factors(x.dtype)
        low = (x @ A.t()) @ B.t()
        if isinstance(alpha, torch.Tensor):
            return self._broadcast_alpha(alpha, x).to(x.dtype) * low
        return float(alpha) * low

    def reference_forward(self, x: torch.Tensor, alpha: AlphaValue) -> torch.Tensor:
        """Pure-PyTorch forward. x [..., in] -> [..., out]; alpha a float or a tensor [rows]
        with rows = x.shape[0] (one per sequence) or x[..., 0].numel() (one per token).

        A nonzero float alpha multiplies by the merged W_base + alpha·W_ortho (one matmul, equal to
        the two streams' sum up to float rounding); per-row alphas keep the streams apart."""
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if not (_is_nonzero(alpha) and self.has_ortho):
            return dual_stream(x, self._cached("base", dtype), bias=bias)
        if isinstance(alpha, torch.Tensor):
            return dual_stream(x, self._cached("base", dtype), self._cached("ortho", dtype),
                               self._broadcast_alpha(alpha, x).to(dtype), bias)
        return dual_stream(x, self._merged(alpha, dtype), bias=bias)

    def _broadcast_alpha(self, alpha: AlphaValue, x: torch.Tensor) -> AlphaValue:
        if not isinstance(alpha, torch.Tensor):
            return torch.tensor(alpha, device=x.device)
        alpha = alpha.to(x.device)
        if x.dim() >= 2 and alpha.numel() == x.shape[0]:
            return alpha.reshape(-1, *([1] * (x.dim() - 1)))
        if alpha.numel() == x[..., 0].numel():
            return alpha.reshape(*x.shape[:-1], 1)
        raise ValueError(
            f"per-row alpha has {alpha.numel()} values; expected one per sequence ({x.shape[0]}) "
            f"or one per token ({x[..., 0].numel()})"
        )

    def _alpha_per_row(self, alpha: AlphaValue, x: torch.Tensor) -> AlphaValue:
        """Alpha for the kernel: a float, or a float32 tensor with one value per flattened token row."""
        if not isinstance(alpha, torch.Tensor):
            return float(alpha)
        per = self._broadcast_alpha(alpha, x)
        return per.expand(*x.shape[:-1], 1).reshape(-1).float().contiguous()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
            f"sym={self.symmetric}, ortho_nnz={self.ortho_nnz}, ortho_rank={self.ortho_rank}, "
            f"lowrank_bits={self.lowrank_bits}, bias={self.bias is not None}"
        )


def dual_stream(
    x: torch.Tensor, W_base: torch.Tensor, W_ortho: torch.Tensor | None = None, alpha: AlphaValue = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's formula on dense weights: Y = X·W_baseᵀ + alpha·(X·W_orthoᵀ) + b.

    x [..., in]; W_base, W_ortho [out, in] in x's dtype; alpha a float or a tensor that
    broadcasts against [..., out] (one value per row); bias [out] or None. The one PyTorch
    copy of the formula: the CPU path of OrthoLinear and the kernels' reference both call it."""
    y = x @ W_base.t()
    if W_ortho is not None:
        y = y + alpha * (x @ W_ortho.t())
    if bias is not None:
        y = y + bias
    return y


def _rank_of(lowrank: tuple[torch.Tensor, torch.Tensor] | LowRank | None) -> int:
    return 0 if lowrank is None else int(lowrank[1].shape[0] if isinstance(lowrank, tuple) else lowrank.rank)


def _bits_of(lowrank: tuple[torch.Tensor, torch.Tensor] | LowRank | None) -> int:
    return lowrank.codes.bits if isinstance(lowrank, LowRank) and lowrank.codes is not None else 16


def _is_nonzero(value: AlphaValue) -> bool:
    if isinstance(value, torch.Tensor):
        return bool((value != 0).any())
    return value != 0


def ortho_layers(model: nn.Module) -> list[OrthoLinear]:
    return [m for m in model.modules() if isinstance(m, OrthoLinear)]
