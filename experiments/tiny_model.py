"""Write a tiny random Llama and a character tokenizer as a Hugging Face folder, for smoke runs
of the experiment drivers (``forget_eval.py --model FOLDER``) in seconds rather than hours.

    python experiments/tiny_model.py OUT_FOLDER
"""
from __future__ import annotations

import string
import sys

import torch


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tf.LlamaForCausalLM(cfg).eval()


if __name__ == "__main__":
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(sys.argv[1])
    tok.save_pretrained(sys.argv[1])
