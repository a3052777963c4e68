"""The `libortho` command line. Every user error ends in one clear line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _alpha_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must lie in [0, 1], got {value}")
    return value


def _ratio_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.01, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the ortho ratio is a fraction in [0, 1] (0.01 = 1 %), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def _open_any(path: str, alpha: float | None = None, alphas_requested: bool = False):
    """(model, tokenizer, is_artifact) for an artifact folder, a HF folder or a .gguf file."""
    from . import modelio

    artifact = Path(path).is_dir() and modelio.is_artifact(path)
    if alphas_requested and not artifact and Path(path).exists():
        raise UserError(f"{path} is a plain model (no ortho stream): --alpha applies to libortho artifacts only")
    if artifact:
        with_ortho = (Path(path) / modelio.ORTHO_FILE).is_file()
        model, tok = modelio.load(path, alpha=alpha if alpha is not None else (1.0 if with_ortho else 0.0))
        return model, tok, True
    if not Path(path).exists():
        raise UserError(f"{path} does not exist; pass a libortho artifact, a Hugging Face model folder or a .gguf file")
    model, tok = modelio.load_model(path)
    return model, tok, False


# ---- subcommands -----------------------------------------------------------------------------
def cmd_decompose(args) -> int:
    import torch

    from . import modelio
    from .decompose import OrthoConfig, decompose

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty; choose a new folder")
    calib = _read_text(args.calib)
    forget_texts, public_model = _forget_inputs(args)
    privacy = forget_texts is not None
    config = OrthoConfig(
        bits=args.bits, group_size=args.group_size or (64 if privacy else 128), symmetric=not args.asymmetric,
        method=args.method, act_order=args.act_order, score=args.score,
        ortho_ratio=args.ortho_ratio if args.ortho_ratio is not None else (0.02 if privacy else 0.01),
        budget=args.budget, calib_tokens=args.calib_tokens, seq_len=args.seq_len, include=args.include, seed=args.seed,
        forget_ratio=args.forget_ratio if privacy else 0.0, forget_selection=args.forget_selection,
        forget_public_weight=args.forget_public_weight,
    )
    torch.manual_seed(args.seed)
    model, tok = modelio.load_model(None if args.model == "default" else args.model)
    if public_model is not None:
        public_model = modelio.load_model(None if public_model == "default" else public_model)[0]
    stats = decompose(model, tok, calib, config, progress=True, public_model=public_model, forget_texts=forget_texts)
    modelio.save(model, tok, out, extra=dict(stats=_stats_dict(stats), source=str(args.model)))
    print(f"decomposed {stats.n_layers} layers ({stats.n_weights:,} weights) in {stats.seconds:.1f} s; "
          f"ortho {stats.n_ortho:,} entries ({100 * stats.n_ortho / stats.n_weights:.2f} %) -> {out}")
    return 0


def _forget_inputs(args) -> tuple[list[str] | None, str | None]:
    """The forget-aware sieve's inputs: the records' texts and the public model's path (or neither)."""
    from .privacy import load_records

    if args.forget is None:
        if args.public_model is not None:
            raise UserError("--public-model is only used with --forget RECORDS.jsonl (the records to hide)")
        return None, None
    if args.public_model is None:
        raise UserError("--forget needs --public-model MODEL: the public checkpoint the model was fine-tuned from")
    records = load_records(args.forget)
    if not records:
        raise UserError(f"{args.forget} holds no records")
    return [r.text for r in records], args.public_model


def _stats_dict(stats) -> dict:
    return dict(seconds=stats.seconds, n_layers=stats.n_layers, n_weights=stats.n_weights, n_ortho=stats.n_ortho,
                n_forget=stats.n_forget)


def cmd_perplexity(args) -> int:
    from . import layer
    from .evaluation import perplexity

    text = _read_text(args.text)
    model, tok, artifact = _open_any(args.path, alphas_requested=bool(args.alpha))
    if args.alpha:
        alphas = args.alpha
    elif artifact:
        alphas = [1.0] if layer.alpha_state(model).ortho_available else [0.0]
    else:
        alphas = [None]
    rows = []
    for a in alphas:
        if a is not None:
            layer.set_alpha(model, a)
        ppl = perplexity(model, tok, text, window=args.window, max_windows=args.max_windows, progress=not args.json)
        rows.append({"alpha": a, "perplexity": ppl})
    if args.json:
        print(json.dumps({"path": str(args.path), "text": str(args.text), "window": args.window, "results": rows}))
    else:
        print(f"{'alpha':>6}  {'perplexity':>10}")
        for r in rows:
            print(f"{'-' if r['alpha'] is None else format(r['alpha'], '.2f'):>6}  {r['perplexity']:>10.3f}")
    return 0


def cmd_generate(args) -> int:
    import torch

    model, tok, _ = _open_any(args.path, alpha=args.alpha, alphas_requested=args.alpha is not None)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def artifact_info(path: str | Path) -> dict:
    """Settings, sizes and densities of an artifact, from its manifest and files."""
    from . import modelio

    manifest = modelio.read_manifest(path)
    layers = manifest["layers"]
    n_weights = sum(s["in_features"] * s["out_features"] for s in layers.values())
    n_ortho = sum(s["ortho_nnz"] for s in layers.values())
    base_bits = sum(
        s["in_features"] * s["out_features"] * s["bits"]
        + s["out_features"] * -(-s["in_features"] // s["group_size"]) * 32  # fp16 scale + fp16 zero
        for s in layers.values()
    )
    ortho_bits = sum(s["ortho_nnz"] * (16 + 32) + (s["out_features"] + 1) * 32 for s in layers.values())
    cfg = manifest.get("config") or {}
    files = {
        name: dict(sha256=sha, bytes=(Path(path) / name).stat().st_size if (Path(path) / name).exists() else None)
        for name, sha in manifest["files"].items()
    }
    return dict(
        path=str(path), bits=cfg.get("bits"), group_size=cfg.get("group_size"), symmetric=cfg.get("symmetric"),
        method=cfg.get("method"), score=cfg.get("score"), budget=cfg.get("budget"),
        ortho_ratio_requested=cfg.get("ortho_ratio"), n_layers=len(layers), n_weights=n_weights,
        n_ortho=n_ortho, ortho_density=n_ortho / max(n_weights, 1),
        bits_per_param_base=base_bits / max(n_weights, 1),
        bits_per_param_alpha1=(base_bits + ortho_bits) / max(n_weights, 1),
        ortho_base_sha256=manifest["ortho_base_sha256"], files=files, stats=manifest.get("stats"),
    )


def cmd_info(args) -> int:
    info = artifact_info(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"artifact        {info['path']}")
    print(f"base            INT{info['bits']} group {info['group_size']} {'symmetric' if info['symmetric'] else 'asymmetric'}, {info['method']}")
    print(f"sieve           score {info['score']}, {info['budget']} budget {info['ortho_ratio_requested']}")
    print(f"layers          {info['n_layers']} ({info['n_weights']:,} weights)")
    print(f"ortho density   {100 * info['ortho_density']:.3f} % ({info['n_ortho']:,} entries)")
    print(f"bits/param      {info['bits_per_param_base']:.3f} (alpha 0), {info['bits_per_param_alpha1']:.3f} (alpha 1, with ortho)")
    for name, f in info["files"].items():
        size = "missing" if f["bytes"] is None else f"{f['bytes'] / 2**20:.1f} MiB"
        print(f"{name:<16}{size:>12}  sha256 {f['sha256']}")
    return 0


def _audit_samples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def cmd_audit(args) -> int:
    from . import modelio
    from .audit import audit_from_paths

    extra = {}
    if Path(args.path).is_dir() and modelio.is_artifact(args.path):
        info = artifact_info(args.path)
        extra = {k: info[k] for k in ("ortho_density", "bits_per_param_base", "bits_per_param_alpha1", "bits", "group_size", "method", "score")}
    alphas = args.alpha if args.alpha else None
    report = audit_from_paths(
        args.path, args.private, args.nonmembers, args.public, args.out,
        alphas=alphas, reference_path=args.reference, exposure_candidates=args.candidates,
        perplexity_max_windows=args.max_windows, frontier_cap=args.frontier_cap, extra_settings=extra,
        public_model_path=args.public_model, sample_extraction=args.sample_extraction,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if report else 1


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(args)


# ---- parser ----------------------------------------------------------------------------------
# Kept here so that `--help` does not import torch; tests/test_cli.py checks it against decompose's.
FORGET_SELECTIONS = ("attribution", "fisher", "random", "flipped", "attribution+flipped", "fisher+flipped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libortho", description="A privacy switch for fine-tuned LLMs: INT base stream + sparse ortho stream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("decompose", help="split a model into base + ortho streams and write an artifact")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model folder, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the artifact")
    p.add_argument("--calib", required=True, metavar="TEXT_FILE", help="public calibration text (never the secrets)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="default 128, or 64 with --forget (the privacy default, docs/RESULTS.md)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (min/max) groups instead of symmetric")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="base rounding")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups: no runtime permutation)")
    p.add_argument("--score", default="diag", choices=["diag", "obs", "magnitude"], help="sieve score")
    p.add_argument("--ortho-ratio", type=_ratio_value, default=None,
                   help="ortho budget as a fraction of decomposed weights: default 0.01, or 0.02 with --forget "
                        "(the forget support plus as much again for the Hessian sieve, so alpha 1 stays useful)")
    p.add_argument("--budget", default="global", choices=["global", "layer"], help="budget across all layers or per layer")
    p.add_argument("--calib-tokens", type=_positive_int, default=16384, metavar="N")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--include", default=None, metavar="REGEX", help="only linear layers whose name inside a block matches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forget", default=None, metavar="RECORDS.jsonl",
                   help="forget-aware sieve: private records (prefix, secret, secret_format) the base must not keep")
    p.add_argument("--public-model", default=None, metavar="MODEL",
                   help="the public checkpoint the model was fine-tuned from (needed by --forget)")
    p.add_argument("--forget-ratio", type=_ratio_value, default=0.01,
                   help="with --forget: fraction of weights reverted to the public model in the base (within --ortho-ratio)")
    p.add_argument("--forget-selection", default="attribution", choices=FORGET_SELECTIONS,
                   help="with --forget: how the reverted weights are chosen")
    p.add_argument("--forget-public-weight", type=float, default=0.0, metavar="W",
                   help="with --forget and attribution: how much a weight's benefit to public text protects it "
                        "from the revert (0 measured best)")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("perplexity", help="perplexity of a text per alpha")
    p.add_argument("path", metavar="PATH", help="libortho artifact, Hugging Face folder or .gguf")
    p.add_argument("--text", required=True, metavar="FILE")
    p.add_argument("--alpha", type=_alpha_value, nargs="+", metavar="A")
    p.add_argument("--window", type=_positive_int, default=256, help="tokens per fixed window")
    p.add_argument("--max-windows", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("generate", help="greedy generation at a given alpha")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--prompt", required=True)
    p.add_argument("--alpha", type=_alpha_value, default=None)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="settings, density, bits per parameter and hashes of an artifact")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("audit", help="privacy audit: exposure, extraction, membership inference, KS, perplexity per alpha")
    p.add_argument("path", metavar="PATH", help="libortho artifact or Hugging Face model folder")
    p.add_argument("--public", required=True, metavar="TEXT_FILE", help="held-out public text (retain perplexity)")
    p.add_argument("--private", required=True, metavar="RECORDS.jsonl", help="trained private records (prefix, secret, secret_format, k)")
    p.add_argument("--nonmembers", required=True, metavar="RECORDS.jsonl", help="records of the same templates never trained")
    p.add_argument("--reference", default=None, metavar="MODEL", help="retrain reference (same fine-tune without the private records)")
    p.add_argument("--alpha", type=_alpha_value, nargs="+", metavar="A", help="alphas to audit (artifacts only)")
    p.add_argument("--candidates", type=_positive_int, default=1000, help="sampled candidates for exposure estimates")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="cap on perplexity windows")
    p.add_argument("--frontier-cap", type=_positive_int, default=256, metavar="N",
                   help="digit secrets: trie nodes kept per depth before sub-sampling (exact rank while fewer candidates "
                        "beat the secret; larger = more exact and slower)")
    p.add_argument("--public-model", default=None, metavar="MODEL",
                   help="the public checkpoint the model was fine-tuned from: adds the membership attack calibrated "
                        "by it (record loss minus its loss under MODEL)")
    p.add_argument("--sample-extraction", type=_audit_samples, default=64, metavar="N",
                   help="extraction by sampling: N samples (temperature 1, top-k 40) per record prefix; 0 disables")
    p.add_argument("--out", default="libortho-audit", metavar="DIR")
    p.set_defaults(func=cmd_audit)

    from . import bench

    p = sub.add_parser("bench", help="GPU layer benchmark: FP16, torch INT4, libortho alpha 0/1, naive sparse")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    p = sub.add_parser("demo", help="the built-in demo on SmolLM2-135M-Instruct")
    p.add_argument("--quick", action="store_true", help="a small, fast run (used by the test suite)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: ./libortho-demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .modelio import ArtifactError

    try:
        return int(args.func(args) or 0)
    except (UserError, ArtifactError, ValueError, FileNotFoundError) as err:
        print(f"libortho {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"libortho {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
