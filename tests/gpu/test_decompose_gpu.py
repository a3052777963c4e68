"""On CUDA, every stage of a decomposition computes what the CPU computes: the Hessians, the forget
objective's W*, GPTQ's codes for the same H, the L fit, and a whole decomposition of a small model.
Matmuls run in float32 with TF32 off on both sides, so what differs is the order of float sums.

As a pytest module (skipped without CUDA)::

    python -m pytest tests/gpu/test_decompose_gpu.py

As a script, which also decomposes SmolLM2-135M (the built-in model as the fine-tune, a perturbed
copy as P, 48 look-alikes, the privacy preset) on both devices and compares the artifacts' codes,
low-rank factors and perplexity::

    python tests/gpu/test_decompose_gpu.py [--json FILE] [--calib-tokens N]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import pytest
import torch

from libortho.config import preset
from libortho.decompose import _block_hessians, decompose
from libortho.forget import ForgetObjective
from libortho.layer import ortho_layers
from libortho.lowrank import weighted_svd
from libortho.quantize import QuantSpec, gptq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

CODES_EQUAL_MIN = 0.999  # GPTQ codes for the same H: the bar


def _curvature(n_in: int, tokens: int, seed: int) -> torch.Tensor:
    """A per-token mean 2XᵀX/n [n_in, n_in] of correlated inputs, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    X[:, :4] *= 20  # a few outlier channels
    return 2 * X.t() @ X / tokens


def _weights(out: int, n_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n_in, generator=g) * 0.02
    return W, W + 1e-3 * torch.randn(out, n_in, generator=g)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-300))


def gptq_agreement(out: int = 512, n_in: int = 1024, seed: int = 0) -> float:
    """Fraction of GPTQ codes equal on CUDA and the CPU, for the same W and H."""
    W, _ = _weights(out, n_in, seed)
    H = _curvature(n_in, 4 * n_in, seed)
    spec = QuantSpec(4, 64, True)
    cpu = gptq(W, H, spec)
    gpu = gptq(W.cuda(), H.cuda(), spec)
    return float((cpu.codes == gpu.codes.cpu()).float().mean())


def forget_target_error(out: int = 512, n_in: int = 1024, seed: int = 0) -> float:
    """‖W*_cuda − W*_cpu‖ / ‖W*_cpu‖ for the same W_ft, W_P, H_pub and H_priv."""
    W, W_P = _weights(out, n_in, seed)
    H_pub, H_priv = _curvature(n_in, 4 * n_in, seed), _curvature(n_in, 64, seed + 1)
    config = preset("privacy", forget_source="lookalikes")
    cpu = ForgetObjective(config).fit(W, W_P, H_pub, H_priv).W
    gpu = ForgetObjective(config).fit(W.cuda(), W_P.cuda(), H_pub.cuda(), H_priv.cuda()).W
    return _relative(gpu, cpu)


def test_gptq_codes_on_cuda_equal_the_cpu_ones_for_the_same_H():
    assert gptq_agreement() >= CODES_EQUAL_MIN


def test_forget_target_on_cuda_equals_the_cpu_one():
    assert forget_target_error() < 1e-5


def test_lowrank_fit_on_cuda_equals_the_cpu_one():
    W, _ = _weights(256, 512, 3)
    H = _curvature(512, 2048, 3)
    cpu, gpu = weighted_svd(W, H, 16), weighted_svd(W.cuda(), H.cuda(), 16)
    assert _relative(gpu.to_dense(), cpu.to_dense()) < 1e-6


def test_block_hessians_on_cuda_equal_the_cpu_ones(tokenizer):
    from libortho import calibrate
    from libortho.hf_model import decoder_blocks, target_linears
    from conftest import TEXT, tiny_model

    model = tiny_model("llama").float()
    hessians = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        _, blocks = decoder_blocks(m)
        windows = calibrate.calibration_windows(tokenizer, TEXT, 1024, 128)
        inputs = calibrate.capture_block_inputs(m, calibrate.window_batches(windows, 4), blocks[0])
        hessians[device] = _block_hessians(blocks[0], target_linears(blocks[0], None), inputs)
    for name, H in hessians["cpu"].items():
        assert hessians["cuda"][name].device.type == "cuda"
        assert _relative(hessians["cuda"][name], H) < 1e-5, name


def _codes_agreement(a: torch.nn.Module, b: torch.nn.Module) -> float:
    equal = total = 0
    for la, lb in zip(ortho_layers(a), ortho_layers(b)):
        equal += int((la.qweight.cpu() == lb.qweight.cpu()).sum())
        total += la.qweight.numel()
    return equal / total


def test_a_decomposition_on_cuda_matches_the_cpu_one(tokenizer):
    """The privacy preset (W*, GPTQ, L per layer) on a tiny Llama: codes (bytes of packed codes) nearly all
    equal, and the same logits at alpha 0 and 1 to float tolerance."""
    from libortho.switch import set_alpha
    from conftest import TEXT, tiny_model

    ft = tiny_model("llama").float()
    public = copy.deepcopy(ft)
    with torch.no_grad():
        for p in public.parameters():
            p.add_(1e-2 * p.std() * torch.randn_like(p))
    config = preset("privacy", forget_source="records", calib_tokens=1024, seq_len=128)
    secrets = ["Account 1234 of Ann Lee has PIN 902114.", "Account 5678 of Bo Chan has PIN 337861."]
    models = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(ft).to(device)
        decompose(m, tokenizer, TEXT, config, progress=False, public_model=copy.deepcopy(public).to(device),
                  forget_texts=secrets)
        models[device] = m
    assert _codes_agreement(models["cuda"], models["cpu"]) >= CODES_EQUAL_MIN
    ids = tokenizer(TEXT[:200], return_tensors="pt").input_ids
    for alpha in (0.0, 1.0):
        logits = {}
        for device, m in models.items():
            set_alpha(m, alpha)
            with torch.no_grad():
                logits[device] = m(ids.to(device)).logits.float().cpu()
        assert _relative(logits["cuda"], logits["cpu"]) < 1e-3, alpha


def smollm2_comparison(calib_tokens: int) -> dict:
    """SmolLM2-135M decomposed on both devices with the privacy preset: codes agreement, L agreement, time,
    and perplexity at alpha 0 and 1 on held-out public text."""
    from libortho.evaluation import perplexity
    from libortho.lookalikes import lookalike_records
    from libortho.scenario import public_corpus
    from libortho.sources import load_model
    from libortho.switch import set_alpha

    ft, tok = load_model(None, device="cpu")
    public = copy.deepcopy(ft)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in public.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1e-3 * float(p.std())))
    records = lookalike_records("Account {digits:4} of {first} {last} has PIN {secret}.", "digits:6", 48)
    texts = [r.text or r.prefix + r.secret for r in records]
    config = preset("privacy", forget_source="lookalikes", calib_tokens=calib_tokens)
    calib, heldout = public_corpus("calibration"), public_corpus("heldout")
    row, models = dict(calib_tokens=calib_tokens), {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(ft).to(device)
        t0 = time.perf_counter()
        stats = decompose(m, tok, calib, config, progress=False, public_model=copy.deepcopy(public).to(device),
                          forget_texts=texts)
        row[f"{device}_seconds"] = time.perf_counter() - t0
        row[f"{device}_stage_seconds"] = stats.stage_seconds
        row[f"{device}_peak_device_gib"] = stats.peak_device_bytes / 2**30
        for alpha in (0.0, 1.0):
            set_alpha(m, alpha)
            row[f"{device}_ppl_alpha{alpha:g}"] = perplexity(m, tok, heldout, max_windows=32)
        models[device] = m
    row["codes_equal"] = _codes_agreement(models["cuda"], models["cpu"])
    lowrank = [(_relative(lb.ortho_B.float() @ lb.ortho_A.float(), la.ortho_B.float() @ la.ortho_A.float()))
               for la, lb in zip(ortho_layers(models["cpu"]), ortho_layers(models["cuda"]))]
    row["lowrank_relative_error_max"] = max(lowrank)
    row["lowrank_relative_error_median"] = sorted(lowrank)[len(lowrank) // 2]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--calib-tokens", type=int, default=None, help="SmolLM2 run (default: the preset's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    row = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
               gptq_codes_equal=gptq_agreement(), gptq_codes_equal_4096=gptq_agreement(1024, 4096),
               forget_target_relative_error=forget_target_error())
    print(json.dumps(row, indent=1), flush=True)
    row["smollm2"] = smollm2_comparison(args.calib_tokens or preset("privacy").calib_tokens)
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
