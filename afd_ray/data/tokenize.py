"""Chat-template tokenisation with prompt/response masks, explicit truncation rules and padding.

Token layout of one example: ``prompt_ids`` (the chat template up to and including the assistant header,
i.e. ``add_generation_prompt=True``) followed by ``response_ids`` (y and the end-of-turn token). Anything a
template puts after the end-of-turn token (SmolLM2 adds "\\n") is cut, so a demonstration ends exactly as a
sampled response does: otherwise a reward model could tell demonstrations from samples by that token alone.

Truncation rules (``TruncationRules``):
- prompt longer than ``max_prompt_tokens``: ``error`` (DataError naming source and row), ``skip`` (counted),
  or ``drop_turns`` (drop the oldest non-system turns until it fits; if the last user turn alone does not
  fit, fall back to error/skip as ``on_bad_row`` says);
- response longer than ``max_response_tokens``: ``truncate`` (keep the first tokens; no end-of-turn token,
  ``truncated=True``), ``error`` or ``skip``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afd_ray.data.schema import DataError, Demonstration

PROMPT_OVERFLOW = ("error", "skip", "drop_turns")
RESPONSE_OVERFLOW = ("truncate", "error", "skip")


@dataclass
class TruncationRules:
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    prompt_overflow: str = "error"
    response_overflow: str = "truncate"
    on_bad_row: str = "error"


@dataclass
class Encoded:
    """One tokenised (x, y). prompt_ids: template up to the assistant header; response_ids: y + end of turn."""

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool = False
    source: str = ""
    row: int | str | None = None


@dataclass
class EncodedPreference:
    """One tokenised (x, y_w, y_l): chosen y_w preferred to rejected y_l, both ending with end of turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    row: int | str | None = None


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template applied to ``messages`` with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_response_ids(tokenizer, messages: list[dict[str, str]], response: str,
                        prompt_ids: list[int] | None = None) -> list[int]:
    """Token ids of y* as the template writes an assistant turn, ending at the end-of-turn token."""
    prompt_ids = render_prompt_ids(tokenizer, messages) if prompt_ids is None else prompt_ids
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=False)
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids):]
        if eos in ids:
            ids = ids[: len(ids) - ids[::-1].index(eos)]  # cut what follows the last end-of-turn token
        else:
            ids = ids + [eos]
    else:  # a template that rewrites earlier turns: fall back to plain text + eos
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    return ids


def encode_demonstration(tokenizer, demo: Demonstration, rules: TruncationRules) -> Encoded:
    """Tokenise one demonstration under ``rules``; raises DataError (kind ``prompt_too_long`` /
    ``response_too_long``) when a rule says error or skip (the caller counts skips)."""
    messages = list(demo.prompt)
    prompt_ids = render_prompt_ids(tokenizer, messages)
    first = 1 if messages[0]["role"] == "system" else 0
    while (len(prompt_ids) > rules.max_prompt_tokens and rules.prompt_overflow == "drop_turns"
           and len(messages) - first > 1):
        del messages[first]  # the oldest turn; the system message and the last user turn stay
        if messages[first]["role"] == "assistant":
            del messages[first]  # keep the history starting on a user turn
        prompt_ids = render_prompt_ids(tokenizer, messages)
    if len(prompt_ids) > rules.max_prompt_tokens:
        raise DataError(demo.source, demo.row, "prompt",
                        f"prompt is {len(prompt_ids)} tokens, longer than max_prompt_tokens="
                        f"{rules.max_prompt_tokens} (set prompt_overflow to skip or drop_turns, or raise the limit)",
                        "prompt_too_long")
    response_ids = render_response_ids(tokenizer, messages, demo.response, prompt_ids)
    truncated = len(response_ids) > rules.max_response_tokens
    if truncated and rules.response_overflow != "truncate":
        raise DataError(demo.source, demo.row, "response",
                        f"response is {len(response_ids)} tokens, longer than max_response_tokens="
                        f"{rules.max_response_tokens}", "response_too_long")
    return Encoded(prompt_ids, response_ids[: rules.max_response_tokens], truncated, demo.source, demo.row)


def encode_demonstrations(tokenizer, demos: Sequence[Demonstration], rules: TruncationRules
                          ) -> tuple[list[Encoded], dict[str, int]]:
    """Tokenise many; returns (encoded, skipped counts by kind). Errors propagate unless the matching
    policy (prompt_overflow / response_overflow / on_bad_row) is ``skip``."""
    out, skipped = [], Counter()
    for demo in demos:
        try:
            out.append(encode_demonstration(tokenizer, demo, rules))
        except DataError as e:
            policy = {"prompt_too_long": rules.prompt_overflow, "response_too_long": rules.response_overflow}
            policy = policy.get(e.kind, rules.on_bad_row)
            if policy == "drop_turns":  # dropping turns was not enough: the last user turn alone is too long
                policy = rules.on_bad_row
            if policy == "skip":
                skipped[e.kind] += 1
                continue
            raise
    if not out:
        raise DataError("demonstrations", None, None, f"every demonstration was skipped ({dict(skipped)})",
                        "empty_dataset")
    return out, dict(skipped)


def encode_preferences(tokenizer, prefs: Sequence, rules: TruncationRules
                       ) -> tuple[list[EncodedPreference], dict[str, int]]:
    """Tokenise preference triples under ``rules`` (both responses as ``encode_demonstration`` would)."""
    from afd_ray.data.schema import Demonstration

    out, skipped = [], Counter()
    for p in prefs:
        try:
            w = encode_demonstration(tokenizer, Demonstration(p.prompt, p.chosen, p.source, p.row), rules)
            lo = encode_demonstration(tokenizer, Demonstration(p.prompt, p.rejected, p.source, p.row), rules)
        except DataError as e:
            policy = {"prompt_too_long": rules.prompt_overflow, "response_too_long": rules.response_overflow}
            policy = policy.get(e.kind, rules.on_bad_row)
            if policy in ("skip", "drop_turns"):
                skipped[e.kind] += 1
                continue
            raise
        out.append(EncodedPreference(w.prompt_ids, w.response_ids, lo.response_ids, p.source, p.row))
    if not out:
        raise DataError("preferences", None, None, f"every preference pair was skipped ({dict(skipped)})",
                        "empty_dataset")
    return out, dict(skipped)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad for generation: returns input_ids (B, T) and attention_mask (B, T), real tokens right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class TokenBatch:
    """Prompt + response sequences, right-padded, for scoring and training.

    input_ids: (B, T); attention_mask: (B, T) 1 on real tokens; response_mask: (B, T) 1 on response tokens.
    For log-probs use logits[:, :-1] against input_ids[:, 1:] with response_mask[:, 1:] (``shifted_mask``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    @property
    def shifted_mask(self) -> torch.Tensor:
        """(B, T-1): which next-token predictions are response tokens."""
        return self.response_mask[:, 1:]


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Concatenate each prompt with its response and right-pad to the longest."""
    if len(prompts) != len(responses):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    resp = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p):n] = 1
    return TokenBatch(ids, attn, resp)
