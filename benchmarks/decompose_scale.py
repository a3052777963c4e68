"""Time and peak memory of `libortho decompose` with the forget objective on random Llama-shaped checkpoints.

Writes (once, into --work) a random Llama checkpoint of the chosen shape in bf16 safetensors shards, the public
checkpoint P (the same weights plus a small random perturbation), a byte-level BPE tokenizer trained with
`tokenizers` on the public corpus, the calibration text and 48 look-alike records (`libortho lookalikes`); then
runs `libortho decompose CKPT OUT --forget LOOK --forget-kind lookalikes --public-model P` in a child process
and records its wall time and peak RSS (the child's ru_maxrss: mapped pages that were touched count).
Random weights say nothing of quality; this measures cost only.

    python benchmarks/decompose_scale.py --shape small [--work /tmp/scale] [--device cpu] [--json docs/scale.json]

On a GPU host, with the checkpoints written from the GPU and a run that must fit a 10-minute window:

    python benchmarks/decompose_scale.py --shape 8b --device cuda --init-device cuda --out 8b-run \
        --time-limit 420 [--extra --resume]

`--time-limit S` interrupts the decomposition after S seconds (Ctrl-C: the work folder keeps every finished
block); the same command with `--extra --resume` continues it. Each run appends its own row; the artifact's
stats (stage times, peak GPU memory) are read from its manifest when it is complete.

Shapes: small (0.17B: hidden 1024, MLP 4096, 8 blocks), 1b, 3b, 8b (Llama-3-8B: hidden 4096, MLP 14336,
32 blocks, 8 KV heads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # hidden, MLP, blocks, heads, KV heads, vocab
    "small": (1024, 4096, 8, 16, 8, 16384),
    "1b": (2048, 8192, 16, 32, 8, 32768),
    "3b": (3072, 8192, 28, 24, 8, 32768),
    "8b": (4096, 14336, 32, 32, 8, 32768),
}
SHARD = "100MB"
PERTURBATION = 1e-3  # P = W + N(0, (PERTURBATION·std W)²) per tensor


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from libortho.scenario import public_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(public_corpus("train").splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


def write_checkpoints(work: Path, shape: str, init_device: str = "cpu") -> tuple[Path, Path]:
    """(fine-tuned folder, public folder), written once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ft, pub = work / f"{shape}-ft", work / f"{shape}-public"
    if (ft / "config.json").is_file() and (pub / "config.json").is_file():
        return ft, pub
    hidden, mlp, blocks, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(init_device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(ft, max_shard_size=SHARD)
    write_tokenizer(ft, vocab)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
            p.add_(noise * (PERTURBATION * float(p.float().std())))
    model.save_pretrained(pub, max_shard_size=SHARD)
    write_tokenizer(pub, vocab)
    return ft, pub


def write_inputs(work: Path) -> tuple[Path, Path]:
    from libortho.scenario import public_corpus

    calib, look = work / "calibration.txt", work / "lookalikes.jsonl"
    if not calib.is_file():
        calib.write_text(public_corpus("calibration"))
    if not look.is_file():
        out = subprocess.run([sys.executable, "-m", "libortho.cli", "lookalikes",
                              "Account {digits:4} of {first} {last} has PIN {secret}.", "--format", "digits:6", "--n", "48"],
                             check=True, capture_output=True, text=True).stdout
        look.write_text(out)
    return calib, look


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--work", default="/tmp/libortho-scale")
    ap.add_argument("--device", default=None, help="sets LIBORTHO_DEVICE for the decomposition")
    ap.add_argument("--init-device", default="cpu", help="where the random checkpoints are initialised (cuda is faster)")
    ap.add_argument("--out", default=None, help="the artifact's folder name under --work (default: one per run)")
    ap.add_argument("--time-limit", type=float, default=None, help="interrupt the decomposition after this many seconds")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `decompose` flags")
    ap.add_argument("--json", default=None, help="append the run to this JSON list")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ft, pub = write_checkpoints(work, args.shape, args.init_device)
    calib, look = write_inputs(work)
    setup_s = time.perf_counter() - t0
    out = work / (args.out or f"{args.shape}-artifact-{int(time.time())}")
    cmd = [sys.executable, "-m", "libortho.cli", "decompose", str(ft), str(out), "--calib", str(calib),
           "--forget", str(look), "--forget-kind", "lookalikes", "--public-model", str(pub),
           *(["--device", args.device] if args.device else []), *args.extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        returncode = proc.wait(timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the CLI keeps the finished blocks for --resume
        returncode = proc.wait()
    wall = time.perf_counter() - t0
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    manifest = out / "libortho.json"
    stats = json.loads(manifest.read_text()).get("stats", {}) if returncode == 0 and manifest.is_file() else {}
    row = dict(shape=args.shape, dims=SHAPES[args.shape], device=args.device or "cpu", returncode=returncode,
               finished=returncode == 0, wall_s=wall, peak_rss_gib=rss_gib, setup_s=setup_s,
               stage_seconds=stats.get("stage_seconds"), decompose_seconds=stats.get("seconds"),
               peak_device_gib=stats.get("peak_device_bytes", 0) / 2**30, command=" ".join(cmd[1:]),
               machine=platform.machine(), cpus=os.cpu_count(), gpu=_gpu_name(args.device),
               date=time.strftime("%Y-%m-%d %H:%M"), libortho_path=str(Path(__file__).resolve().parents[1]))
    print(json.dumps(row, indent=1))
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(rows + [row], indent=1) + "\n")
    sys.exit(returncode)


def _gpu_name(device: str | None) -> str | None:
    if not device or not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    main()
