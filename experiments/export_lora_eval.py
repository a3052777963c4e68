"""What `libortho export --lora` gives back: the demo's artifact served by existing engines.

An engine that serves per-request LoRA adapters (vLLM) offers alpha 0 and 1 as "the exported
compressed-tensors base" and "that base + the PEFT adapter" (the low-rank part L = B·A; the sparse
part S is not exported). This driver measures both next to libortho's own alpha 0 / 1 and the FP
fine-tune, on the demo scenario with the demo's own decomposition:

1. `libortho.demo.run_demo` as `libortho demo` runs it (the cached demo scenario, the privacy
   preset in look-alike mode, the same audit): rows fp, alpha=0, alpha=1, reference, and the artifact;
2. `libortho.export.export(artifact, ct, lora=adapter)`;
3. the export through transformers + compressed-tensors (loaded as tests/test_export.py does: one
   forward dequantizes the packed weights) = the alpha-0 engine, and PEFT's `PeftModel` on it with
   the adapter, unmerged = the alpha-1 engine; each audited with the demo's audit options (its
   held-out perplexity windows, PIN exposure budgets, greedy extraction, sampling at the alpha-0
   engine as the demo samples alpha 0), the public model's record losses from step 1;
4. checks: the adapter's A, B are the artifact's; max |logit difference| of the engines against
   `libortho.load(artifact, alpha)` on the held-out text and every member record; the ortho
   stream's sparse entries (nnz) and bytes; the files' byte sizes.

Writes docs/export/lora_demo.json. One scenario seed (0), one decomposition seed (0): the demo's.

    python experiments/export_lora_eval.py [--work DIR] [--threads 2] [--reuse]

--reuse: keep step 1's results from an earlier run in --work (the artifact and its report.json).
The scenario must already be cached (`libortho demo` builds it); this driver refuses to fine-tune.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "export" / "lora_demo.json"
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def file_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def hf_engine(ct: Path, ids_for_warmup: torch.Tensor):
    """The compressed-tensors export as transformers loads it (tests/test_export.py `_hf`): the
    packed tensors are dequantized into plain nn.Linear weights by the first forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ct).eval()
    with torch.no_grad():
        model(ids_for_warmup)
    return model


def peft_engine(ct: Path, adapter: Path, ids_for_warmup: torch.Tensor):
    import peft

    return peft.PeftModel.from_pretrained(hf_engine(ct, ids_for_warmup), adapter).eval()


def logits_diff(a_model, b_model, inputs: list[torch.Tensor]) -> dict:
    """max |logit difference| over the inputs, its bound (float16 unit roundoff × max |logit|, the
    tolerance of tests/test_export.py) and the share of positions whose argmax differs."""
    worst, scale, flips, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in inputs:
            a, b = a_model(ids).logits.float(), b_model(ids).logits.float()
            worst = max(worst, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
            flips += int((a.argmax(-1) != b.argmax(-1)).sum())
            n += a.shape[1]
    return dict(max_abs_diff=worst, fp16_bound=2.0**-11 * scale, within_bound=worst <= 2.0**-11 * scale,
                argmax_flips=flips, positions=n)


def row_summary(row: dict, label: str) -> dict:
    keep = ("perplexity", "measured_exposure_by_k", "exposure_by_k", "extrapolated_exposure_by_k", "extraction_by_k",
            "sampled_extraction_by_k", "member_loss_mean", "nonmember_loss_mean", "exposure_methods", "seconds")
    out = {"label": label, **{k: row.get(k) for k in keep}}
    out["mia_auc"] = {m: v["auc"] for m, v in row["mia"].items()}
    out["ks_vs_reference_pvalue"] = (row.get("ks_vs_reference") or {}).get("pvalue")
    return out


def member_details(records: list[dict]) -> dict:
    return {d["id"]: dict(k=d["k"], exposure=d.get("exposure"), method=d.get("exposure_method"),
                          extracted=d.get("extracted"), loss=d.get("loss"))
            for d in records if d["member"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/libortho-export-lora-eval"),
                    help="scratch folder: the demo's artifact and report, the export, the adapter")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the demo run (artifact, report.json) in --work")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test on the demo's --quick plan (its scenario and budgets); writes into --work")
    args = ap.parse_args(argv)
    if args.quick:
        args.work = args.work / "quick"
        if args.out == OUT:
            args.out = args.work / "lora_quick.json"
    torch.set_num_threads(args.threads)

    from libortho import artifact as art
    from libortho import load as ortho_load
    from libortho.audit import audit
    from libortho.demo import DEMO_CONFIG, DemoPlan, format_summary, run_demo
    from libortho.export import ADAPTER_WEIGHTS, WEIGHTS_FILE, export
    from libortho.privacy import forget_quality
    from libortho.scenario import build_scenario, scenario_dir

    plan = DemoPlan.of(quick=args.quick)
    sdir = scenario_dir(plan.scenario_config())
    if not (sdir / "scenario.json").is_file():
        print(f"the demo scenario is not cached at {sdir}: run `libortho demo` first (this driver does not fine-tune)",
              file=sys.stderr)
        return 2
    say(f"demo scenario cached at {sdir}")

    # ---- 1. the demo, as `libortho demo` runs it ------------------------------------------------
    demo_dir = args.work / "demo"
    artifact_dir = demo_dir / "artifact"
    if args.reuse and (demo_dir / "report.json").is_file() and (artifact_dir / "libortho.json").is_file():
        say(f"reusing the demo run in {demo_dir}")
        report = json.loads((demo_dir / "report.json").read_text())
    else:
        say("running libortho.demo.run_demo (decompose + audit: fp, alpha 0, alpha 1, reference)")
        demo_dir.mkdir(parents=True, exist_ok=True)
        report = run_demo(quick=args.quick, out_dir=demo_dir, progress=True)
        print(format_summary(report), flush=True)
    t_demo = report["settings"]["wall_seconds"]  # run_demo's own wall time (also when reused)
    say("demo done")

    # ---- 2. the export ----------------------------------------------------------------------
    ct, adapter = args.work / "ct", args.work / "adapter"
    for folder in (ct, adapter):
        if folder.exists():
            shutil.rmtree(folder)
    t = time.perf_counter()
    export(artifact_dir, ct, lora=adapter)
    t_export = time.perf_counter() - t
    say(f"exported to {ct} and {adapter} in {t_export:.1f} s")

    manifest = art.read_manifest(artifact_dir)
    layers = manifest["layers"]
    nnz = sum(int(s.get("ortho_nnz", 0)) for s in layers.values())
    ranks = [int(s.get("ortho_rank", 0)) for s in layers.values()]
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    ob = report["settings"]["ortho_bytes"]
    sizes = dict(
        artifact_files=file_bytes(artifact_dir), export_files=file_bytes(ct), adapter_files=file_bytes(adapter),
        export_model_bytes=(ct / WEIGHTS_FILE).stat().st_size,
        adapter_bytes=(adapter / ADAPTER_WEIGHTS).stat().st_size,
        demo_ortho_bytes=ob,
    )
    sizes["adapter_over_export_model"] = sizes["adapter_bytes"] / sizes["export_model_bytes"]
    sizes["lowrank_over_base_stored"] = ob["lowrank"] / ob["base"]
    sizes["sparse_share_of_ortho_bytes"] = ob["sparse"] / (ob["sparse"] + ob["lowrank"])
    sparse = dict(
        nnz=nnz, layers=len(layers), layers_with_rank=sum(r > 0 for r in ranks), rank_min=min(ranks), rank_max=max(ranks),
        adapter_r=adapter_cfg["r"],
        note=("the ortho stream has no sparse entries: its 'sparse' bytes are the CSR row pointers of the empty S "
              "(int32, one per output row + 1 per layer), which the adapter has no need for") if nnz == 0 else
             "the sparse part S below is left out of the adapter",
    )
    say(f"sizes: export model {sizes['export_model_bytes']:,} B, adapter {sizes['adapter_bytes']:,} B "
        f"({100 * sizes['adapter_over_export_model']:.1f} %); sparse nnz {nnz}, "
        f"sparse share of the ortho bytes {100 * sizes['sparse_share_of_ortho_bytes']:.2f} %")

    # ---- 4. checks against libortho's own forward ----------------------------------------------
    scenario = build_scenario(plan.scenario_config(), progress=False)  # a cache hit (checked above)
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()
    heldout = scenario.read_split("heldout")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ct, local_files_only=True)
    inputs = [tok(heldout, return_tensors="pt").input_ids[:, :256]] + [
        tok(r.text, return_tensors="pt").input_ids for r in members]

    from safetensors.torch import load_file

    ortho = load_file(artifact_dir / "ortho.safetensors")
    lora = load_file(adapter / ADAPTER_WEIGHTS)
    same_factors = all(
        torch.equal(lora[f"base_model.model.{n}.lora_A.weight"], ortho[f"{n}.ortho_A"])
        and torch.equal(lora[f"base_model.model.{n}.lora_B.weight"], ortho[f"{n}.ortho_B"])
        for n, s in layers.items() if s["ortho_rank"] > 0)
    sparse["max_abs_sparse_value"] = max(
        (ortho[k].abs().max().item() for k in ortho if k.endswith("ortho_val") and ortho[k].numel()), default=0.0)
    del ortho, lora

    say("logit checks: export base vs libortho alpha 0, export base + adapter vs libortho alpha 1")
    ref0, _ = ortho_load(artifact_dir, alpha=0.0, with_ortho=False)
    ct_model = hf_engine(ct, inputs[0])
    checks = dict(adapter_factors_equal_artifact=same_factors,
                  export_base_vs_alpha0=logits_diff(ct_model, ref0, inputs))
    weight_dtype = str(next(ct_model.parameters()).dtype)
    del ref0, ct_model
    ref1, _ = ortho_load(artifact_dir, alpha=1.0)
    pe_model = peft_engine(ct, adapter, inputs[0])
    checks["export_lora_vs_alpha1"] = logits_diff(pe_model, ref1, inputs)
    scaling = {float(m.scaling["default"]) for m in pe_model.modules()
               if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    checks["peft_scalings"] = sorted(scaling)
    checks["export_weight_dtype"] = weight_dtype
    ref1.eval()
    del ref1, pe_model
    for k, v in checks.items():
        say(f"  {k}: {v}")

    # ---- 3. the engines audited as the demo audits ---------------------------------------------
    options = plan.audit_options()
    public_losses = report["public_losses"]
    reference_losses = [d["loss"] for d in report["records"]["reference"] if d["member"]]
    rows = {}
    for label, opener, sample in (
        ("export base (alpha-0 engine)", lambda: hf_engine(ct, inputs[0]), True),
        ("export base + LoRA (alpha-1 engine)", lambda: peft_engine(ct, adapter, inputs[0]), False),
    ):
        say(f"audit: {label}")
        model = opener()
        opts = dict(options, sample_extraction=options["sample_extraction"] if sample else 0,
                    sample_conditions=("model",) if sample else None)
        r = audit(model, tok, heldout, members, nonmembers, alphas=None, goals=False, public_losses=public_losses,
                  progress=True, **opts)
        (row,) = r["rows"]
        losses = [d["loss"] for d in r["records"]["model"] if d["member"]]
        row["ks_vs_reference"] = {"pvalue": float(forget_quality(np.array(losses), np.array(reference_losses)).pvalue)}
        rows[label] = (row, r["records"]["model"])
        say(f"  ppl {row['perplexity']:.3f}, measured exposure {row['measured_exposure_by_k']}, "
            f"extraction {row['extraction_by_k']} ({row['seconds']:.0f} s)")
        del model

    demo_labels = {"fp": "FP fine-tune", "alpha=0": "libortho alpha 0", "alpha=1": "libortho alpha 1",
                   "reference": "retrain reference"}
    table = [row_summary(row, demo_labels[row["label"]]) for row in report["rows"] if row["label"] != "reference"]
    table += [row_summary(row, label) for label, (row, _) in rows.items()]
    table += [row_summary(row, demo_labels["reference"]) for row in report["rows"] if row["label"] == "reference"]
    details = {demo_labels[k]: member_details(v) for k, v in report["records"].items()}
    details.update({label: member_details(recs) for label, (_, recs) in rows.items()})

    import peft
    import compressed_tensors
    import transformers

    out = dict(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command="python experiments/export_lora_eval.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        machine=dict(cpu=cpu_name(), torch_threads=torch.get_num_threads(), platform=platform.platform(),
                     note="2 CPU cores shared with other jobs; timings are indicative only"),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                      compressed_tensors=compressed_tensors.__version__, python=platform.python_version()),
        seeds=dict(scenario=plan.scenario_config().seed, decomposition=DEMO_CONFIG.get("seed", 0), audit=0,
                   note="one scenario seed and one decomposition: the demo's (no spread over seeds)"),
        scenario=report["settings"]["scenario"], decomposition=report["settings"]["decomposition"],
        audit_options=options,
        exposure_measure="PIN exposure from measured ranks only (bits; skew-normal extrapolations left out), "
                         "as the demo's summary; extraction: greedy, per k; sampled: 64 samples at T=1, top-k 40",
        sizes=sizes, sparse_part=sparse, checks=checks,
        rows=table, member_details=details,
        seconds=dict(demo=t_demo, export=t_export, total=time.perf_counter() - T0),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")

    ks = ["1", "4", "16"]
    print(f"\n{'condition':<38}{'ppl':>8}" + "".join(f"{'exp k=' + k:>10}" for k in ks) + f"{'extr k=16':>11}"
          + f"{'samp k=16':>11}")
    for row in table:
        m = row["measured_exposure_by_k"]
        s = (row["sampled_extraction_by_k"] or {}).get("16")
        print(f"{row['label']:<38}{row['perplexity']:>8.3f}" + "".join(f"{m.get(k, float('nan')):>10.2f}" for k in ks)
              + f"{100 * row['extraction_by_k']['16']:>10.0f}%" + (f"{100 * s:>10.0f}%" if s is not None else f"{'–':>11}"))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
