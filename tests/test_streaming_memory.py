"""A streamed decomposition's peak host memory, bounded from the model's shapes.

A child process decomposes a random Llama of 48 narrow blocks (hidden 256, MLP 512), streamed from its
safetensors, with the forget objective against a public copy P and per-layer low-rank ortho streams (the
privacy preset's shape of work). It first runs the same decomposition on a one-block copy, so that lazy imports
and first-call caches are paid before the measurement; then it resets the peak (/proc/self/clear_refs) and
reports how far the peak RSS rose above the RSS at the start of the measured run.

The bound is the sum of what a streamed run may hold at once (`streamed_bound`), with the allocator's slack
bounded by one stage's working set (freed pages are handed back before each layer's fit and after each block).
It is well below the decoder blocks' float32 size (113 MB), so a run that held every block would fail it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TEXT, char_tokenizer

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self"),
              pytest.mark.slow]  # about 90 s on two cores

HIDDEN, MLP, KV, BLOCKS = 256, 512, 128, 48
CALIB_TOKENS, SEQ_LEN, BATCH = 2048, 128, 8
MB = 2**20


def block_weights() -> int:
    """Linear weights of one block: q, o [h, h]; k, v [kv, h]; gate, up [m, h]; down [h, m]."""
    return 2 * HIDDEN**2 + 2 * KV * HIDDEN + 3 * HIDDEN * MLP


def streamed_bound() -> int:
    """Bytes a streamed decomposition may add to the host's peak, from the shapes alone (float32 = 4 bytes)."""
    block = 4 * block_weights()
    read = 2 * block  # the block in float32, and a tensor's copies while it is read from its shard
    batch = BATCH * SEQ_LEN
    # one calibration batch through the block: gate, act, up and their product [batch, m]; norms, q/k/v, rotary and
    # attention about 8 × [batch, h]; each distinct input's XᵀX and running sum, the largest [m, m]
    forward = 4 * (4 * batch * MLP + 8 * batch * HIDDEN + 2 * MLP**2 + 3 * 2 * HIDDEN**2)
    carried = 4 * 2 * CALIB_TOKENS * HIDDEN  # the hidden states entering and leaving the block
    # one layer's fit at in = m: H_pub, H_priv, the pull, H', H'_d and its factor (6 × [m, m] float32), or the
    # low-rank fit's float64 H_d (2 × [m, m] × 4 bytes), plus that layer's [out, in] copies: W, W_P, W*, W_base, R
    # and E in float64 (8 × [h, m] × 4 bytes)
    fits = 4 * (max(6, 2 * 2) * MLP**2 + 8 * HIDDEN * MLP)
    # kept across blocks: every block's packed INT4 base at g64 (0.5 + 4/64 bytes a weight) and its low-rank
    # factors (25 % of that), and about 10 kB of Python objects per layer
    kept = BLOCKS * (1.25 * 0.5625 * block_weights() + 7 * 10_000)
    slack = max(forward, fits)  # freed heap pages not yet handed back: at most one stage's working set
    return int(read + forward + carried + fits + kept + slack)


CHILD = textwrap.dedent("""
    import json, re, sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    import libortho
    from libortho.decompose import decompose
    from libortho.memory import release_freed_memory
    from libortho.shards import ShardedCheckpoint
    from libortho.streaming import open_streamed

    root, text = sys.argv[1], open(sys.argv[2]).read()
    forget = ["Account 4410 of Ada Lovelace has PIN 829104.", "Account 2207 of Alan Turing has PIN 310552."] * 8
    config = libortho.OrthoConfig(calib_tokens=%d, seq_len=%d, batch_size=%d, group_size=64, forget_source="records",
                                  ortho_budget=0.25, lowrank_share=1.0)
    tok = AutoTokenizer.from_pretrained(root + "/ft")

    def run(name):
        model, loader = open_streamed(root + "/" + name)
        return model, loader

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    model, loader = run("ft1")  # the warm-up: every code path once
    decompose(model, tok, text, config, progress=False, public_model=ShardedCheckpoint(root + "/pub1"),
              forget_texts=forget, work_dir=root + "/work1", block_loader=loader)
    del model, loader
    model, loader = run("ft")
    release_freed_memory()
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
    start = status("VmRSS")
    decompose(model, tok, text, config, progress=False, public_model=ShardedCheckpoint(root + "/pub"),
              forget_texts=forget, work_dir=root + "/work", block_loader=loader)
    print(json.dumps(dict(growth=status("VmHWM") - start)))
""" % (CALIB_TOKENS, SEQ_LEN, BATCH))


def write_checkpoints(root, blocks: int, suffix: str) -> None:
    """A random Llama of `blocks` blocks (float32 safetensors, 20 MB shards) and P, the same plus 1e-3 noise."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=blocks, num_attention_heads=4,
                            num_key_value_heads=KV // 64, vocab_size=104, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / f"ft{suffix}", max_shard_size="20MB")
    char_tokenizer().save_pretrained(root / f"ft{suffix}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * float(p.std()) * torch.randn_like(p))
    model.save_pretrained(root / f"pub{suffix}", max_shard_size="20MB")


def test_a_streamed_decomposition_holds_one_block_at_a_time(tmp_path):
    assert streamed_bound() < 4 * BLOCKS * block_weights()  # the bound would catch a run that held every block
    write_checkpoints(tmp_path, BLOCKS, "")
    write_checkpoints(tmp_path, 1, "1")
    (tmp_path / "text.txt").write_text(TEXT)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "text.txt")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    print(f"peak RSS growth {growth / MB:.1f} MB, bound {streamed_bound() / MB:.1f} MB")
    assert growth <= streamed_bound(), f"peak RSS grew by {growth / MB:.1f} MB, bound {streamed_bound() / MB:.1f} MB"
