"""`libortho demo`: the built-in demo on SmolLM2-135M-Instruct and Python documentation."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import modelio
from .decompose import OrthoConfig, decompose
from .evaluation import mean_nll, token_windows
from .layer import set_alpha


def quality_demo(quick: bool, out_dir: Path) -> dict:
    """Decompose the default model with the default settings and measure held-out perplexity per alpha."""
    from .scenario import public_corpus

    torch.manual_seed(0)
    model, tok = modelio.load_model(None)
    windows = token_windows(tok, public_corpus("heldout"), 256, 8 if quick else 48)
    rows = [dict(model="FP32 (original)", alpha=None, perplexity=_ppl(model, windows))]
    config = OrthoConfig(calib_tokens=2048 if quick else 16384)
    stats = decompose(model, tok, public_corpus("calibration"), config)
    for a in (0.0, 0.5, 1.0):
        set_alpha(model, a)
        rows.append(dict(model="libortho", alpha=a, perplexity=_ppl(model, windows)))
    modelio.save(model, tok, out_dir / "artifact", overwrite=True)
    return dict(
        config=config.to_dict(), decompose_seconds=stats.seconds,
        ortho_density=stats.n_ortho / stats.n_weights, heldout_tokens=int(windows.numel()), rows=rows,
    )


def _ppl(model, windows) -> float:
    return float(torch.exp(torch.tensor(mean_nll(model, windows))))


def run(args) -> int:
    out_dir = Path(args.out or "libortho-demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = quality_demo(args.quick, out_dir)
    report["wall_seconds"] = time.perf_counter() - start
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nheld-out perplexity (Python docs, {report['heldout_tokens']} tokens), "
          f"ortho density {100 * report['ortho_density']:.2f} %")
    print(f"{'model':<18}{'alpha':>7}{'perplexity':>12}")
    for r in report["rows"]:
        print(f"{r['model']:<18}{'-' if r['alpha'] is None else format(r['alpha'], '.2f'):>7}{r['perplexity']:>12.3f}")
    print(f"artifact: {out_dir / 'artifact'}   report: {out_dir / 'quality.json'}")
    return 0
