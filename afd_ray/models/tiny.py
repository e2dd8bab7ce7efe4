"""Tiny random Llama models with a real tokenizer, built on the fly for tests and the toy task."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_llama(
    out_dir: str | Path,
    tokenizer_path: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised LlamaForCausalLM plus ``tokenizer_path``'s tokenizer to ``out_dir``.

    head_dim = hidden_size / num_heads must be >= 32 (vLLM-CPU rejects 16). Embeddings are tied, so the
    size is dominated by vocab x hidden (49152 x 64 = 3.1M parameters for the SmolLM2 tokenizer).
    Deterministic in ``seed``. Returns the folder.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(
            f"tiny llama: head_dim = hidden_size/num_heads = {hidden_size}/{num_heads} must be an integer >= 32 "
            "(vLLM-CPU's attention rejects smaller heads)"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
