"""Golden rewards: a Python ``module:function`` on token ids, or an HF sequence classifier on text; mean
with standard error; win rate of one policy's responses against another's under the golden reward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Scorer = Callable[[list[list[int]], list[list[int]]], list[float]]


def load_golden(spec: str, tokenizer, device: str = "cpu", batch_size: int = 16) -> Scorer | None:
    """``module:function(prompts, responses, tokenizer) -> list[float]`` on token ids, or the path / Hub id
    of an HF ``*ForSequenceClassification`` golden reward model, which scores the decoded (prompt,
    response) text pair with its own tokenizer (the OpenAssistant reward models' input). Empty: None."""
    if not spec:
        return None
    module, sep, _ = spec.partition(":")
    if sep and "/" not in module and not module.startswith("."):
        from afd_ray.rewards import import_function

        fn = import_function(spec, "run.golden_reward")
        return lambda prompts, responses: [float(x) for x in fn(prompts, responses, tokenizer)]
    return HFGolden(spec, tokenizer, device, batch_size)


class HFGolden:
    """An HF sequence classifier as the golden reward: logit 0 of (prompt text, response text)."""

    def __init__(self, path: str, policy_tokenizer, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.policy_tokenizer, self.device, self.batch_size = policy_tokenizer, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        dec = self.policy_tokenizer.decode
        out = []
        for i in range(0, len(prompts), self.batch_size):
            p = [dec(x, skip_special_tokens=True) for x in prompts[i:i + self.batch_size]]
            r = [dec(x, skip_special_tokens=True) for x in responses[i:i + self.batch_size]]
            enc = self.tokenizer(p, r, return_tensors="pt", padding=True, truncation=True).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n))."""
    n = len(xs)
    if not n:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(n - 1, 1) / n)


def win_rate(candidate: list[float], baseline: list[float]) -> tuple[float, float]:
    """P(candidate > baseline) per prompt, ties counting 1/2, with its standard error."""
    if len(candidate) != len(baseline):
        raise ValueError(f"win_rate: {len(candidate)} candidate vs {len(baseline)} baseline scores")
    return mean_se([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(candidate, baseline)])
