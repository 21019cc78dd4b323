"""Tiny Hugging Face causal LMs (random configs, no hub) and a byte-level BPE tokenizer trained here
with ``tokenizers``, for the evaluation engine's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ("the cat sat on a mat with another catty dog and dogs sitting near the red house , while rain fell . "
         "Emma said that nobody knew why").split()


def write_text_folder(root: Path, *, seed: int = 0, lines: dict | None = None, long_every: int = 5) -> Path:
    """train/valid/test .txt of random lines; every ``long_every``-th line is long (several windows)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (lines or {"train": 200, "valid": 20, "test": 16}).items():
        text = []
        for i in range(n):
            size = int(rng.integers(40, 90)) if i % long_every == long_every - 1 else int(rng.integers(3, 12))
            text.append(" ".join(rng.choice(WORDS, size)))
        (root / f"{split}.txt").write_text("\n".join(text) + "\n")
    return root


def train_tokenizer(files: list[Path], vocab_size: int = 120, special: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer (GPT-2's scheme) with ``special`` as BOS/EOS, as a fast HF tokenizer
    (``vocab_size`` up to 257: the 256 bytes and the special token, no merges; above: merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special)


def tiny_model(kind: str, vocab_size: int, positions: int = 64, seed: int = 0):
    """A random tiny GPT-2, Llama or GPT-NeoX causal LM (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size, n_positions=positions))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=positions))
    elif kind == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 vocab_size=vocab_size, max_position_embeddings=positions))
    else:
        raise ValueError(kind)
    return model.eval()


def hf_folder(root: Path, kind: str = "gpt2", *, seed: int = 0) -> tuple[Path, Path]:
    """(a saved model + tokenizer folder, the text folder it reads)."""
    text = write_text_folder(root / "text", seed=seed)
    tok = train_tokenizer([text / "train.txt"])
    model = tiny_model(kind, len(tok), seed=seed)
    out = root / f"{kind}-model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, text
