"""Reward accuracy on held-out preference pairs (RewardBench-style jsonl) for any reward model, and the
implicit reward accuracy of DPO / SPIN policies: beta * log(pi / pi_ref) (seeds/004 Eq. 18).

RewardBench-style rows: {"prompt": str | messages, "chosen": str, "rejected": str, "subset": str (optional)};
HH-RLHF text rows work too. Accuracy is the fraction of pairs with r(x, y_w) > r(x, y_l), overall and per
subset, with standard errors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from afd_ray.data.tokenize import EncodedPreference
from afd_ray.eval.golden import mean_se


def load_preference_pairs(source: str, tokenizer, max_prompt_tokens: int = 1024, max_response_tokens: int = 1024,
                          limit: int | None = None) -> tuple[list[EncodedPreference], list[str]]:
    """Tokenised pairs and each pair's subset ("all" when the file has none). ``toy`` gives the toy task's
    golden-ranked pairs (afd_ray.toy.make_preferences, a seed no training run uses), half of them with
    responses of varying length (subset ``toy-length``) and half of 8 digits each (``toy-parity``: only the
    parity rule separates them). ``toy-fixed``: the fixed-length variant's pairs (8 digits, no end token),
    all in subset ``toy-parity``."""
    if source == "toy-fixed":
        from afd_ray import toy

        return toy.make_preferences(tokenizer, limit or 512, seed=7_778, eos=False), ["toy-parity"] * (limit or 512)
    if source == "toy":
        from afd_ray import toy

        k = (limit or 512) // 2
        prefs = toy.make_preferences(tokenizer, k, seed=7_777) + toy.make_preferences(tokenizer, k, seed=7_778,
                                                                                     vary_length=False)
        return prefs, ["toy-length"] * k + ["toy-parity"] * k
    from afd_ray.data.readers import iter_file_rows
    from afd_ray.data.schema import parse_preference
    from afd_ray.data.tokenize import TruncationRules, encode_preferences

    prefs, subsets = [], []
    for row, raw in iter_file_rows(source):
        prefs.append(parse_preference(raw, str(source), row))
        subsets.append(str(raw.get("subset", "all")) if isinstance(raw, dict) else "all")
        if limit and len(prefs) >= limit:
            break
    encoded, _ = encode_preferences(tokenizer, prefs, TruncationRules(max_prompt_tokens, max_response_tokens,
                                                                      response_overflow="truncate"))
    return encoded, subsets


def accuracy(scores_chosen: list[float], scores_rejected: list[float], subsets: list[str]) -> dict[str, float]:
    hits = [1.0 if a > b else 0.0 for a, b in zip(scores_chosen, scores_rejected)]
    acc, se = mean_se(hits)
    out = {"accuracy": acc, "accuracy_se": se, "pairs": float(len(hits))}
    for name in sorted(set(subsets)):
        sub = [h for h, s in zip(hits, subsets) if s == name]
        out[f"subset/{name}"] = sum(sub) / len(sub)
    return out


def reward_accuracy(score: Callable[[list[list[int]], list[list[int]]], list[float]],
                    pairs: list[EncodedPreference], subsets: list[str]) -> dict[str, float]:
    """``score(prompts, responses)`` of any reward model on chosen and rejected responses."""
    prompts = [p.prompt_ids for p in pairs]
    return accuracy(score(prompts, [p.chosen_ids for p in pairs]), score(prompts, [p.rejected_ids for p in pairs]),
                    subsets)


def hf_reward_scorer(path: str, pad_token_id: int, batch_size: int = 16, device: str = "cpu"):
    """r_phi of a saved afd_ray / HF sequence-classification reward model, in-process."""
    from afd_ray.data.tokenize import collate
    from afd_ray.models.loading import load_reward_model, reward_forward

    model = load_reward_model(path).to(device).eval()

    @torch.no_grad()
    def score(prompts, responses):
        out = []
        for i in range(0, len(prompts), batch_size):
            b = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_token_id)
            out += reward_forward(model, b.input_ids.to(device), b.attention_mask.to(device)).tolist()
        return out

    return score


def sequence_logprobs(path: str, pad_token_id: int, batch_size: int = 16, device: str = "cpu"):
    """log pi(y | x) summed over response tokens, of a causal LM, in-process."""
    from afd_ray.data.tokenize import collate
    from afd_ray.models.loading import load_policy, response_logprobs

    model = load_policy(path).to(device).eval()

    @torch.no_grad()
    def logp(prompts, responses):
        out = []
        for i in range(0, len(prompts), batch_size):
            b = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_token_id)
            mask = b.shifted_mask.to(device)
            out += response_logprobs(model, b.input_ids.to(device), b.attention_mask.to(device), mask).sum(1).tolist()
        return out

    return logp


def implicit_reward_accuracy(policy: str, reference: str, beta: float, pairs: list[EncodedPreference],
                             subsets: list[str], pad_token_id: int) -> dict[str, float]:
    """Accuracy of r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) on the pairs (DPO / SPIN policies)."""
    pi, ref = sequence_logprobs(policy, pad_token_id), sequence_logprobs(reference, pad_token_id)

    def score(prompts, responses):
        return [beta * (a - b) for a, b in zip(pi(prompts, responses), ref(prompts, responses))]

    return reward_accuracy(score, pairs, subsets)
