"""Launch sizing shared by the kernel launches: the split-K factor, its workspace and
per-device counters, and the ortho chunk size E from the layer's density; and whether
kernels run in Triton's CPU interpreter."""
from __future__ import annotations

import os
from typing import Any, Tuple

import torch

_MAX_COUNTERS = 1 << 16
_COUNTERS: dict = {}
_SMS: dict = {}


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-device int32 split-K counters, zero between launches (kernels reset them).
    Shared by all layers: launches on one stream run in order. Concurrent launches of
    split-K kernels on different streams of one device are not supported."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # as triton.cdiv; Triton itself is optional for importing this


def _pow2_at_least(v: float) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def auto_e(nnz: int, n: int, split: int, bn: int, rows: bool) -> int:
    """Ortho chunk size from the layer's density so that a typical program needs one step:
    per-row slices (gemv / rows mode): ~1.5x the mean entries per row per split (4..64);
    one-hot tile mode: a quarter of the tile's entries per split (32..128)."""
    per_row = nnz / max(1, n) / max(1, split)
    if rows:
        return max(4, min(64, _pow2_at_least(1.5 * per_row + 1)))
    return max(32, min(128, _pow2_at_least(per_row * bn / 4)))


def _num_sms(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _SMS:
        _SMS[key] = (torch.cuda.get_device_properties(device).multi_processor_count
                     if device.type == "cuda" else 4)
    return _SMS[key]


def choose_split(requested: Any, tiles: int, k: int, bk: int, device: torch.device) -> int:
    """Split-K factor: the config's SPLIT if > 0, else enough programs for ~4 per SM while
    keeping at least 4 K tiles per split. Never more tiles than the counter buffer holds."""
    if tiles > _MAX_COUNTERS:
        return 1
    req = int(requested or 0)
    if req > 0:
        return max(1, min(req, _cdiv(k, bk)))
    target = 4 * _num_sms(device)
    split = 1
    while tiles * split * 2 <= target and _cdiv(k, bk * split * 2) >= 4:
        split *= 2
    return split


def split_buffers(tiles: int, split: int, bm: int, bn: int, y: torch.Tensor,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ws, cnt) for a launch of ``tiles`` output tiles of [bm, bn] in ``split`` K parts: the
    fp32 partials workspace and the shared counters; without split-K the kernel never reads
    them, so ``y`` stands in for both."""
    if split <= 1:
        return y, y
    ws = torch.empty(tiles * split * bm * bn, dtype=torch.float32, device=device)
    return ws, _counters(device, tiles)
