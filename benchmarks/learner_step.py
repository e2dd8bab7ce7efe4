"""Policy-learner step: afd_ray's loss path against the plain HF loss a user would write instead.

Both do forward + backward + AdamW on the same random-initialised Llama of a given shape:
  afd_ray:  logits -> token_logprobs (float32 logsumexp) -> ppo_clip_loss on response tokens
  hf:       model(input_ids, labels=...) (transformers' fused cross-entropy on the same tokens)
It also records the numerics that set the weight-sync tolerance: mean |log p_bf16 - log p_fp32| per token.

    python benchmarks/learner_step.py --shape smollm2-135m --batch 8 --seq 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afd_ray.algo.losses import ppo_clip_loss  # noqa: E402
from afd_ray.algo.masked import token_logprobs  # noqa: E402
from benchmarks.common import save  # noqa: E402

SHAPES = {  # (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 2, 2, 128, 49152),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
}


def build(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def step_fn(model, path: str, ids, mask, adv):
    if path == "afd_ray":
        logp = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
        loss, _ = ppo_clip_loss(logp, logp.detach(), adv[:, None].expand_as(logp), mask[:, 1:])
    else:
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss


def measure(model, path, ids, mask, adv, steps, device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn(model, path, ids, mask, adv)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up kernels and allocates optimizer state
            times.append(time.perf_counter() - t0)
    tokens = int(mask[:, 1:].sum())
    out = {"step_seconds_median": statistics.median(times), "trained_tokens_per_step": tokens,
           "trained_tokens_per_second": tokens / statistics.median(times)}
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


@torch.no_grad()
def bf16_logprob_error(shape: str, device: str, ids) -> float:
    fp32 = build(shape, torch.float32, device)
    ref = token_logprobs(fp32(input_ids=ids).logits[:, :-1], ids[:, 1:])
    bf16 = fp32.to(torch.bfloat16)
    low = token_logprobs(bf16(input_ids=ids).logits[:, :-1], ids[:, 1:])
    return float((low - ref).abs().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32, help="leading tokens of each sequence that are prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    vocab = SHAPES[a.shape][5]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g).to(device)
    mask = torch.zeros(a.batch, a.seq, dtype=torch.float32, device=device)
    mask[:, a.prompt:] = 1
    adv = torch.randn(a.batch, generator=g).to(device)
    results = {}
    for path in ("afd_ray", "hf"):
        model = build(a.shape, dtype, device)
        results[path] = measure(model, path, ids, mask, adv, a.steps, device)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    results["speed_ratio_afd_over_hf"] = results["hf"]["step_seconds_median"] / results["afd_ray"]["step_seconds_median"]
    results["bf16_vs_fp32_mean_abs_logprob_diff"] = bf16_logprob_error(a.shape, device, ids[:2, : min(a.seq, 128)])
    save("learner_step", {**vars(a), "device": device}, results, a.out)


if __name__ == "__main__":
    main()
