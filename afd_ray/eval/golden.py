"""Golden rewards: a Python ``module:function`` on token ids, or an HF sequence classifier reading (x, y) in
the format it was trained on; mean with standard error; win rate of one policy's responses against
another's under the golden reward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Scorer = Callable[[list[list[int]], list[list[int]]], list[float]]


def load_golden(spec: str, tokenizer, fmt: str = "auto", prompts: dict | None = None, device: str = "cpu",
                batch_size: int = 16) -> Scorer | None:
    """``module:function(prompts, responses, tokenizer) -> list[float]`` on token ids, or the path / Hub id
    of an HF ``*ForSequenceClassification`` golden reward model, which reads (x, y) in ``fmt``
    (``run.golden_format``, afd_ray.data.render; ``prompts``: the run's prompt messages by token ids, from
    ``prompt_messages``). Empty: None."""
    if not spec:
        return None
    module, sep, _ = spec.partition(":")
    if sep and "/" not in module and not module.startswith("."):
        from afd_ray.rewards import import_function

        fn = import_function(spec, "run.golden_reward")
        return lambda prompts, responses: [float(x) for x in fn(prompts, responses, tokenizer)]
    return HFGolden(spec, tokenizer, fmt, prompts or {}, device, batch_size)


class HFGolden:
    """An HF sequence classifier as the golden reward: its logit 0 of (x, y) in the format it was trained on
    (``fmt``: auto / chat / hh / pair, afd_ray.data.render). ``auto`` is the policy's token ids when the model
    shares the policy's tokenizer and template, else its chat template, else the text pair."""

    def __init__(self, path: str, policy_tokenizer, fmt: str = "auto", prompts: dict | None = None,
                 device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from afd_ray.data.render import Rerender, resolve_format

        self.policy_tokenizer, self.device, self.batch_size = policy_tokenizer, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.fmt = resolve_format(fmt, policy_tokenizer, self.tokenizer, "run.golden_format", fallback="pair")
        self.rerender = Rerender(policy_tokenizer, self.tokenizer, self.fmt, prompts or {},
                                 "run.golden_format") if self.fmt else None

    def _encode(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        if self.fmt == "pair":
            p, r = self.rerender.texts(prompts, responses)
            return self.tokenizer(p, r, return_tensors="pt", padding=True, truncation=True)
        if self.fmt is None:
            ids = [list(p) + list(r) for p, r in zip(prompts, responses)]
        else:
            ids = [p + r for p, r in map(self.rerender.one, prompts, responses)]
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[i:i + self.batch_size], responses[i:i + self.batch_size]).to(self.device)
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


def golden_comparison(candidate: list[float], baseline: list[float]):
    """The golden reward as a pairwise critic: per prompt a win (candidate scores higher), tie or lose, in the
    judge's result form, so its ``summary()`` gives the same win / tie / lose rates with standard errors."""
    from afd_ray.eval.judge import Comparison, JudgeResult

    if len(candidate) != len(baseline):
        raise ValueError(f"golden_comparison: {len(candidate)} candidate vs {len(baseline)} baseline scores")
    return JudgeResult([Comparison(i, "win" if a > b else "tie" if a == b else "lose")
                        for i, (a, b) in enumerate(zip(candidate, baseline))])
