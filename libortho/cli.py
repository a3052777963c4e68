"""The `libortho` command line. Every user error ends in one clear line on stderr and exit code 2.

The checks on argument values and input files live in cli_args.py; this module holds the
subcommands, the parser and `main` (the console entry point).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .cli_args import (
    UserError,
    alpha_value,
    checked_prompt,
    nonnegative_float,
    positive_int,
    ratio_value,
    read_secrets,
    read_text,
    regex_value,
    seed_value,
    whole_number,
    window_value,
)

EXIT_USER_ERROR = 2


def _open_any(path: str, alpha: float = 0.0, alphas_requested: bool = False, highest_alpha: float | None = None):
    """(model, tokenizer, is_artifact) for an artifact folder, a HF folder or a .gguf file.

    An artifact opens at `alpha` (0 unless the user asked for more: fail closed), and opens its
    ortho file only when `highest_alpha` (default `alpha`) is above 0: alpha 0 never needs it."""
    from . import sources

    p = sources.existing_model_path(path)
    if alphas_requested and not sources.names_artifact(p):
        raise UserError(f"{path} is a plain model (no ortho stream): --alpha applies to libortho artifacts only")
    return sources.open_any(p, alpha=alpha, highest_alpha=highest_alpha)


# ---- subcommands -----------------------------------------------------------------------------
def cmd_decompose(args) -> int:
    import torch

    from . import artifact
    from . import sources
    from .decompose import decompose
    from .fsutil import check_output_dir
    from .state import state_of
    from .workfolder import WorkFolder, WorkFolderError, work_folder_for

    out = Path(args.out_dir)
    check_output_dir(out)  # before hours of work, not after
    work = work_folder_for(out)
    if work.exists() and not args.resume:
        raise UserError(f"{work} holds an unfinished decomposition into {out} "
                        f"({unfinished_summary(work)}): add --resume to continue it, or remove {work} to start over")
    if args.resume and work.exists():
        print(f"resuming: {unfinished_summary(work)} in {work}", file=sys.stderr)
    calib = read_text(args.calib)
    source, forget_texts = _forget_source(args)
    config = decompose_config(args, source)
    torch.manual_seed(config.seed)
    # The decoder blocks are read from disk one at a time as the decomposition reaches them.
    device = sources.checked_device(args.device, "--device") if args.device is not None else None
    model, tok, block_loader = sources.open_streamed_model(None if args.model == "default" else args.model, device)
    public_model = None
    if args.public_model is not None:
        public_source = None if args.public_model == "default" else args.public_model
        if config.forget_target == "public_activations":  # P's own blocks run on the forget texts: P in memory
            public_model = sources.load_model(public_source, device=device)[0]
        else:  # only P's weights are read, one layer at a time from its safetensors, while that layer is fitted
            public_model = sources.public_checkpoint(public_source)
    try:
        stats = decompose(model, tok, calib, config, progress=True, public_model=public_model, forget_texts=forget_texts,
                          work_dir=work, block_loader=block_loader)
    except WorkFolderError as err:
        raise UserError(str(err)) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: {unfinished_summary(work)} in {work}; run the same command with --resume to continue",
              file=sys.stderr)
        raise
    del public_model
    state_of(model).provenance["source"] = str(args.model)
    artifact.save(model, tok, out, ortho_mode=None if args.ortho_follow_umask else 0o600)
    WorkFolder(work).remove()
    peak = f", peak {stats.peak_device_bytes / 2**30:.1f} GiB" if stats.peak_device_bytes else ""
    print(f"decomposed {stats.n_layers} layers ({stats.n_weights:,} weights) in {stats.seconds:.1f} s on {stats.device}{peak}; "
          f"ortho {stats.n_ortho:,} entries ({100 * stats.n_ortho / stats.n_weights:.2f} %) -> {out}")
    return 0


# `decompose` flags that set an OrthoConfig field of the same name; None = the preset's value.
CONFIG_FLAGS = ("bits", "group_size", "method", "act_order", "score", "ortho_ratio", "budget", "calib_tokens",
                "seq_len", "include", "seed", "forget_lambda", "forget_target", "sieve_private_weight", "ortho_budget",
                "lowrank_share", "lowrank_fit", "lowrank_bits", "lowrank_target", "sieve_private_inputs")


def decompose_config(args, source: str):
    """The OrthoConfig of a `decompose` call: the preset (quality, or privacy with a forget source)
    with every flag the user gave on top; the config is the one source of every default."""
    from .config import preset

    chosen = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    if args.asymmetric:
        chosen["symmetric"] = False
    if args.forget_free is not None:
        chosen["forget_mu"] = args.forget_free
    return preset("quality" if source == "none" else "privacy", forget_source=source, **chosen)


def _forget_source(args) -> tuple[str, list[str] | None]:
    """(forget_source, forget texts) from --forget / --forget-free, checked against --public-model."""
    from .forget import read_forget_texts

    if args.forget is not None and args.forget_free is not None:
        raise UserError("--forget and --forget-free are two forget sources; pass one of them")
    if args.forget is None and args.forget_free is None:
        if args.public_model is not None:
            raise UserError("--public-model is only used with a forget source: --forget FILE or --forget-free MU")
        if args.sieve_private_weight or args.sieve_private_inputs:
            raise UserError("--sieve-private-weight and --sieve-private-inputs need forget texts: pass --forget FILE")
        return "none", None
    if args.public_model is None:
        flag = "--forget" if args.forget is not None else "--forget-free"
        raise UserError(f"{flag} needs --public-model MODEL: the public checkpoint the model was fine-tuned from")
    if args.forget_free is not None:
        if args.sieve_private_weight or args.sieve_private_inputs:
            raise UserError("--sieve-private-weight and --sieve-private-inputs need forget texts: pass --forget FILE "
                            "instead of --forget-free")
        return "free", None
    return args.forget_kind, read_forget_texts(args.forget)


def cmd_perplexity(args) -> int:
    from . import switch
    from .evaluation import PERPLEXITY_WINDOW, perplexity

    text = read_text(args.text)
    window = args.window if args.window is not None else PERPLEXITY_WINDOW
    model, tok, artifact = _open_any(args.path, alphas_requested=bool(args.alpha), highest_alpha=max(args.alpha or [0.0]))
    # Fail closed: an artifact is measured at alpha 0 unless --alpha asks for more.
    alphas = args.alpha if args.alpha else ([0.0] if artifact else [None])
    rows = []
    for a in alphas:
        scope = switch.alpha(model, a) if a is not None else contextlib.nullcontext()
        with scope:
            ppl = perplexity(model, tok, text, window=window, max_windows=args.max_windows, progress=not args.json)
        rows.append({"alpha": a, "perplexity": ppl})
    if args.json:
        print(json.dumps({"path": str(args.path), "text": str(args.text), "window": window, "results": rows}))
    else:
        print(f"{'alpha':>6}  {'perplexity':>10}")
        for r in rows:
            print(f"{'-' if r['alpha'] is None else format(r['alpha'], '.2f'):>6}  {r['perplexity']:>10.3f}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .hf_model import pad_token_id

    prompt = checked_prompt(args.prompt)
    model, tok, _ = _open_any(args.path, alpha=args.alpha or 0.0, alphas_requested=args.alpha is not None)
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError(f"--prompt {prompt!r} gives no tokens with this model's tokenizer")
    _check_context(model, ids.shape[1], args.max_new_tokens)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok))
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def _check_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context window."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new_tokens > context:
        left = context - prompt_tokens
        raise UserError(
            f"--max-new-tokens {max_new_tokens} runs past the model's context: {context} tokens, of which the prompt "
            f"takes {prompt_tokens}" + (f"; ask for at most {left}" if left > 0 else "; shorten the prompt")
        )


def unfinished_summary(work: Path) -> str:
    """'k of n decoder blocks done', from a work folder's progress."""
    from .workfolder import WorkFolder, WorkFolderError

    try:
        progress = WorkFolder(work).progress()
    except WorkFolderError as err:
        return str(err)
    return "no block done yet" if progress is None else f"{progress.done} of {progress.n_blocks} decoder blocks done"


def cmd_info(args) -> int:
    from .artifact_info import artifact_info
    from .workfolder import work_folder_for

    work = work_folder_for(args.path)
    if not Path(args.path).exists() and work.is_dir():
        raise UserError(f"{args.path} is an unfinished decomposition ({unfinished_summary(work)}, kept in {work}): "
                        "run the same `libortho decompose` command with --resume to finish it")

    info = artifact_info(args.path, verify_ortho=args.verify_ortho)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"artifact        {info['path']}")
    print(f"base            INT{info['bits']} group {info['group_size']} {'symmetric' if info['symmetric'] else 'asymmetric'}, {info['method']}")
    print(f"sieve           score {info['score']}, {info['budget']} budget {info['ortho_ratio_requested']}")
    print(f"layers          {info['n_layers']} ({info['n_weights']:,} weights)")
    print(f"ortho density   {100 * info['ortho_density']:.3f} % ({info['n_ortho']:,} entries)")
    print(f"bits/param      {info['bits_per_param_base']:.3f} (alpha 0), {info['bits_per_param_alpha1']:.3f} (alpha 1, with ortho)")
    base = max(info["base_bytes"], 1)
    print(f"ortho bytes     sparse S {info['sparse_bytes']:,} ({100 * info['sparse_bytes'] / base:.1f} % of the base), "
          f"low-rank L {info['lowrank_bytes']:,} ({100 * info['lowrank_bytes'] / base:.1f} %, ranks "
          f"{', '.join(map(str, info['lowrank_ranks']))}"
          + "".join(f"; {b}-bit" for b in info["lowrank_bits"]) + ")")
    for name, f in info["files"].items():
        size = "missing" if f["bytes"] is None else f"{f['bytes'] / 2**20:.1f} MiB"
        print(f"{name:<24}{size:>12}  sha256 {f['sha256'][:16]}…  {f['status']}")
    print("checked         every file against its SHA-256 in libortho.json and the manifest schema"
          + (", the ortho CSR structure" if args.verify_ortho else "; ortho.safetensors stat-ed only (--verify-ortho)"))
    return 0


def cmd_audit(args) -> int:
    from . import artifact
    from .artifact_info import artifact_info
    from .audit import audit_from_paths
    from .privacy.extraction import Sampling

    extra = {}
    if Path(args.path).is_dir() and artifact.is_artifact(args.path):
        info = artifact_info(args.path)
        extra = {k: info[k] for k in ("ortho_density", "bits_per_param_base", "bits_per_param_alpha1", "bits", "group_size", "method", "score")}
    # Fail closed: an artifact is audited at alpha 0 unless --alpha asks for more.
    alphas = args.alpha if args.alpha else ([0.0] if extra else None)
    sample_extraction = Sampling.n_samples if args.sample_extraction is None else args.sample_extraction
    public_model = args.public_model
    if public_model == "default":  # the built-in model, as decompose --public-model reads it
        from .sources import default_model_source

        public_model = default_model_source()
    given = dict(exposure_candidates=args.candidates, perplexity_max_windows=args.max_windows,
                 frontier_cap=args.frontier_cap, sample_extraction=sample_extraction)
    report = audit_from_paths(
        args.path, args.private, args.nonmembers, args.public, args.out,
        alphas=alphas, reference_path=args.reference, extra_settings=extra, public_model_path=public_model,
        **{k: v for k, v in given.items() if v is not None},
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if report else 1


def cmd_lookalikes(args) -> int:
    from .lookalikes import lookalike_records
    from .records import save_records

    exclude = read_secrets(args.exclude) if args.exclude else []
    records = lookalike_records(args.template, args.format, args.n, args.seed, exclude)
    if args.out is None:
        sys.stdout.write("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))
    else:
        save_records(records, args.out)
        print(f"wrote {len(records)} look-alike records to {args.out}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(args)


def cmd_export(args) -> int:
    from .export import export

    fmt = args.format or "compressed-tensors"
    out = export(args.path, args.out, format=fmt, lora=args.lora)
    lora = f"; LoRA adapter (the low-rank ortho part) -> {args.lora}" if args.lora is not None else ""
    print(f"exported the alpha-0 base of {args.path} as {fmt} -> {out}{lora}")
    return 0


# ---- parser ----------------------------------------------------------------------------------
def _preset_default(field: str, presets: tuple[str, ...] = ("quality", "privacy")) -> str:
    """'default X' or 'default X (quality preset), Y with a forget source (privacy preset)', from config.py."""
    from .config import preset

    values = [getattr(preset(name, **({"forget_source": "records"} if name == "privacy" else {})), field)
              for name in presets]
    if len(set(map(repr, values))) == 1:
        return f"default {values[0]}"
    return f"default {values[0]}, or {values[1]} with a forget source (the privacy preset)"


def _audit_default(field: str):
    """An audit option's default, from AuditConfig (the one place it is written)."""
    from .audit.config import AuditConfig

    return AuditConfig.__dataclass_fields__[field].default


def build_parser() -> argparse.ArgumentParser:
    from .config import (
        BITS, BUDGETS, FORGET_SOURCES, FORGET_TARGETS, GROUP_SIZES, LOWRANK_BITS, LOWRANK_FITS, LOWRANK_TARGETS, METHODS, SCORES,
        SIEVE_PRIVATE_INPUTS,
    )
    from .evaluation import PERPLEXITY_WINDOW
    from .privacy.extraction import Sampling

    parser = argparse.ArgumentParser(prog="libortho", description="A privacy switch for fine-tuned LLMs: INT base stream + sparse ortho stream.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("decompose", help="split a model into base + ortho streams and write an artifact")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model folder, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the artifact")
    p.add_argument("--calib", required=True, metavar="TEXT_FILE", help="public calibration text (never the secrets)")
    p.add_argument("--bits", type=int, default=None, choices=BITS, help=f"base bits ({_preset_default('bits')})")
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help=f"input columns per scale ({_preset_default('group_size')})")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (min/max) groups instead of symmetric")
    p.add_argument("--method", default=None, choices=METHODS, help=f"base rounding ({_preset_default('method')})")
    p.add_argument("--act-order", action="store_const", const=True, default=None,
                   help="GPTQ act-order (static groups: no runtime permutation)")
    p.add_argument("--score", default=None, choices=SCORES, help=f"sieve score ({_preset_default('score')})")
    p.add_argument("--ortho-ratio", type=ratio_value, default=None,
                   help="a sparse-only ortho budget as a fraction of decomposed weights; given alone, it replaces the "
                        f"preset's --ortho-budget ({_preset_default('ortho_ratio')})")
    p.add_argument("--ortho-budget", type=nonnegative_float, default=None, metavar="FRACTION",
                   help="ortho bytes as a fraction of the base's bytes (0.25 = 25 %%), split between the sparse part S "
                        "(what INT4 dropped) and a low-rank part L = B·A (what undoes the forget edit); wins over "
                        f"--ortho-ratio ({_preset_default('ortho_budget')}; None: --ortho-ratio, sparse only)")
    p.add_argument("--lowrank-share", type=ratio_value, default=None, metavar="SHARE",
                   help=f"the low-rank part's share of --ortho-budget's bytes ({_preset_default('lowrank_share')})")
    p.add_argument("--lowrank-fit", default=None, choices=LOWRANK_FITS,
                   help="how L is fitted: svd (H-weighted SVD of the residual), edit (the forget edit in the "
                        f"eigenbasis of (H_priv, H')), random (a control) ({_preset_default('lowrank_fit')})")
    p.add_argument("--lowrank-bits", type=int, default=None, choices=LOWRANK_BITS,
                   help="how L is stored: 16 (B and A in fp16), 8 or 4 (integer codes in groups of 64: the same bytes "
                        f"buy about 1.9x / 3.6x the rank) ({_preset_default('lowrank_bits')})")
    p.add_argument("--lowrank-target", default=None, choices=LOWRANK_TARGETS,
                   help="what L is fitted to: residual (W_ft - W_base on each layer's own inputs) or propagated (the "
                        "fine-tune's outputs on the inputs alpha 1 gives each layer, so that L also corrects what earlier "
                        f"blocks pass on; per-layer ranks, L only) ({_preset_default('lowrank_target')})")
    p.add_argument("--budget", default=None, choices=[b for b in BUDGETS if b != "threshold"],
                   help=f"budget across all layers or per layer ({_preset_default('budget')})")
    p.add_argument("--calib-tokens", type=positive_int, default=None, metavar="N",
                   help=f"calibration tokens ({_preset_default('calib_tokens')})")
    p.add_argument("--seq-len", type=positive_int, default=None, help=f"tokens per calibration window ({_preset_default('seq_len')})")
    p.add_argument("--include", type=regex_value, default=None, metavar="REGEX", help="only linear layers whose name inside a block matches")
    p.add_argument("--seed", type=seed_value, default=None, help=f"({_preset_default('seed')})")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model is read to and every stage is fitted: cpu, cuda or cuda:N "
                        "(default: $LIBORTHO_DEVICE, else cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into OUT_DIR after its last finished decoder block (the work folder "
                        ".OUT_DIR.libortho-work beside it, removed on success); refused if the inputs or flags changed")
    p.add_argument("--ortho-follow-umask", action="store_true",
                   help="create ortho.safetensors with the umask's mode like the other files, instead of 0600 "
                        "(owner only: it carries what alpha 0 hides)")
    g = p.add_argument_group(
        "forget objective",
        "fit the INT base so that it acts like the fine-tuned model on public inputs and like the public "
        "model P on the inputs of the texts to forget (H' = H_pub + lam H_priv); the ortho stream restores "
        "the fine-tuned weights at alpha 1. Needs --public-model and one source: --forget FILE or --forget-free MU",
    )
    g.add_argument("--forget", default=None, metavar="FILE",
                   help="texts to forget: JSONL records (prefix+secret, or text) or plain text, one per line: the "
                        "records to hide, or look-alikes of them (see `libortho lookalikes`)")
    g.add_argument("--forget-kind", default="records", choices=[s for s in FORGET_SOURCES if s in ("records", "lookalikes")],
                   help="what --forget holds: the records themselves, or look-alikes never trained (recorded in the artifact)")
    g.add_argument("--forget-free", type=nonnegative_float, default=None, metavar="MU",
                   help="no texts: pull the base toward P wherever public text does not look (mu * mean(diag H_pub) * I)")
    g.add_argument("--public-model", default=None, metavar="MODEL",
                   help="the public checkpoint the model was fine-tuned from ('default' = the built-in model)")
    g.add_argument("--forget-lambda", type=nonnegative_float, default=None, metavar="LAM",
                   help=f"weight of the forget texts relative to public text, by Hessian trace "
                        f"({_preset_default('forget_lambda', ('privacy',))})")
    g.add_argument("--forget-target", default=None, choices=FORGET_TARGETS,
                   help="what the forget texts' term asks of each layer: act like P's weight on the base's own inputs, "
                        "or like P on P's own activations of the same tokens (loads all of P into memory; "
                        f"{_preset_default('forget_target', ('privacy',))})")
    g.add_argument("--sieve-private-weight", type=nonnegative_float, default=None, metavar="LAM_S",
                   help="choose and refit the ortho stream under H_pub + LAM_S H_priv, so that alpha 1 restores more "
                        f"of what the base dropped on the forget texts ({_preset_default('sieve_private_weight', ('privacy',))})")
    g.add_argument("--sieve-private-inputs", default=None, choices=SIEVE_PRIVATE_INPUTS,
                   help="collect that H_priv on the forget texts as the decomposed blocks pass them on (base: alpha 0's "
                        "inputs) or as the fine-tuned blocks do (finetuned: what alpha 1 restores) "
                        f"({_preset_default('sieve_private_inputs', ('privacy',))})")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("lookalikes", help="write look-alike records (random secrets in a template) as forget texts")
    p.add_argument("template", metavar="TEMPLATE",
                   help="e.g. 'Account {digits:4} of {first} {last} has PIN {secret}.'; slots: {secret} (once), "
                        "{first}, {last}, {word}, {digits:N}, {hex:N}; {{ and }} are literal braces")
    p.add_argument("--format", required=True, metavar="KIND:N", help="the secret's format, e.g. digits:6 or hex:8")
    p.add_argument("--n", type=positive_int, default=64, help="number of records (default 64)")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="secrets never to emit: one per line, or JSONL records (their 'secret')")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--out", default=None, metavar="FILE", help="JSONL output (default: stdout)")
    p.set_defaults(func=cmd_lookalikes)

    p = sub.add_parser("perplexity", help="perplexity of a text per alpha")
    p.add_argument("path", metavar="PATH", help="libortho artifact, Hugging Face folder or .gguf")
    p.add_argument("--text", required=True, metavar="FILE")
    p.add_argument("--alpha", type=alpha_value, nargs="+", metavar="A", help="alphas to measure (artifacts; default 0)")
    p.add_argument("--window", type=window_value, default=None, help=f"tokens per fixed window (default {PERPLEXITY_WINDOW})")
    p.add_argument("--max-windows", type=positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("generate", help="greedy generation at a given alpha")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--prompt", required=True)
    p.add_argument("--alpha", type=alpha_value, default=None, help="artifacts only; default 0 (the base stream)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="settings, density, bits per parameter and hashes of an artifact")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify-ortho", action="store_true",
                   help="also hash ortho.safetensors and check its CSR structure (by default it is only stat-ed)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("audit", help="privacy audit: exposure, extraction, membership inference, KS, perplexity per alpha")
    p.add_argument("path", metavar="PATH", help="libortho artifact or Hugging Face model folder")
    p.add_argument("--public", required=True, metavar="TEXT_FILE", help="held-out public text (retain perplexity)")
    p.add_argument("--private", required=True, metavar="RECORDS.jsonl", help="trained private records (prefix, secret, secret_format, k)")
    p.add_argument("--nonmembers", required=True, metavar="RECORDS.jsonl", help="records of the same templates never trained")
    p.add_argument("--reference", default=None, metavar="MODEL", help="retrain reference (same fine-tune without the private records)")
    p.add_argument("--alpha", type=alpha_value, nargs="+", metavar="A", help="alphas to audit (artifacts only; default 0)")
    p.add_argument("--candidates", type=positive_int, default=None,
                   help=f"sampled candidates for exposure estimates (default {_audit_default('exposure_candidates')})")
    p.add_argument("--max-windows", type=positive_int, default=None, help="cap on perplexity windows")
    p.add_argument("--frontier-cap", type=positive_int, default=None, metavar="N",
                   help="digit secrets: trie nodes kept per depth before sub-sampling (exact rank while fewer candidates "
                        "beat the secret; larger = more exact and slower)")
    p.add_argument("--public-model", default=None, metavar="MODEL",
                   help="the public checkpoint the model was fine-tuned from ('default' = the built-in model): adds the "
                        "membership attack calibrated by it (record loss minus its loss under MODEL)")
    p.add_argument("--sample-extraction", type=whole_number, default=None, metavar="N",
                   help="extraction by sampling: N samples (temperature 1, top-k 40) per record prefix; 0 disables "
                        f"(default {Sampling.n_samples}: this command samples, the library's AuditConfig does not by default)")
    p.add_argument("--out", default="libortho-audit", metavar="DIR")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("export", help="write the public base (alpha 0) for existing engines (vLLM, transformers)")
    p.add_argument("path", metavar="ARTIFACT", help="libortho artifact folder")
    p.add_argument("out", metavar="OUT", help="new folder for the exported model (no byte of the ortho stream is written there)")
    p.add_argument("--format", default=None, choices=["compressed-tensors"],
                   help="checkpoint format: compressed-tensors pack-quantized (symmetric INT4/INT8 bases whose group "
                        "size divides every layer's input width) (default compressed-tensors)")
    p.add_argument("--lora", default=None, metavar="OUT_ADAPTER",
                   help="also write the ortho stream's low-rank part B·A as a PEFT LoRA adapter in this new folder; "
                        "the sparse part S is NOT included, so base + adapter equals alpha 1 only when the ortho "
                        "stream is low-rank alone (--lowrank-share 1)")
    p.set_defaults(func=cmd_export)

    from . import kernel_bench

    p = sub.add_parser("bench", help="GPU layer benchmark: FP16, torch INT4, libortho alpha 0/1, naive sparse")
    kernel_bench.add_arguments(p)
    p.set_defaults(func=kernel_bench.run)

    p = sub.add_parser("demo", help="the built-in demo on SmolLM2-135M-Instruct")
    p.add_argument("--quick", action="store_true", help="a small, fast run (used by the test suite)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: ./libortho-demo)")
    p.set_defaults(func=cmd_demo)

    from .serve import commands as serve_commands

    serve_commands.register(sub)  # serve, keys
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .artifact_format import ArtifactError

    try:
        return int(args.func(args) or 0)
    except (UserError, ArtifactError, ValueError, OSError) as err:  # OSError: permissions, full disk, ...
        print(f"libortho {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"libortho {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
