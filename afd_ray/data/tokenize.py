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
  ``truncated=True``), ``error`` or ``skip``;
- text holding a special token's string (``<|im_end|>``, ``<|im_start|>``, the eos token, ...), which plain
  tokenisation turns into a control token (a forged turn, an end of turn mid-response): ``on_special_tokens``
  ``error`` (DataError naming source, row, field and token) or ``escape`` (tokenised as plain text; the
  template's own control tokens stay control tokens);
- with ``on_bad_row=skip``, more than ``max_skip_fraction`` of the rows bad (skips by a length rule do not
  count: they are a chosen filter) is an error.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from afd_ray.data.schema import DataError, Demonstration, Preference, check_skip_fraction

PROMPT_OVERFLOW = ("error", "skip", "drop_turns")
RESPONSE_OVERFLOW = ("truncate", "error", "skip")
LENGTH_KINDS = ("prompt_too_long", "response_too_long")  # skipped by a length rule, not bad rows
PRIVATE_USE = 0xF0000  # Plane 15 private use: stands in for special-token text while templating


@dataclass
class TruncationRules:
    """What encoding does with rows that do not fit or are bad (module docstring); the data.* keys of the
    same names."""

    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    prompt_overflow: str = "error"
    response_overflow: str = "truncate"
    on_bad_row: str = "error"
    on_special_tokens: str = "error"
    max_skip_fraction: float = 0.1


@dataclass
class Encoded:
    """One tokenised (x, y). prompt_ids: template up to the assistant header; response_ids: y + end of turn."""

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool = False
    source: str = ""
    row: int | str | None = None
    messages: list[dict[str, str]] | None = None  # the prompt's chat messages (after drop_turns); toy: None


@dataclass
class EncodedPreference:
    """One tokenised (x, y_w, y_l): chosen y_w preferred to rejected y_l, both ending with end of turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    row: int | str | None = None
    messages: list[dict[str, str]] | None = None  # the prompt's chat messages; toy: None


@lru_cache(maxsize=8)
def _specials(tokenizer) -> tuple[re.Pattern, list[str]]:
    """A regex (one group) for the strings the tokenizer reads as special tokens wherever they occur in text
    (eos, bos, pad and every added token marked special), and those strings, longest first as it matches."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens = sorted(set(tokenizer.all_special_tokens) | added, key=len, reverse=True)
    return re.compile("(" + ("|".join(map(re.escape, tokens)) or "(?!)") + ")"), tokens


def _chat_ids(tokenizer, messages: list[dict[str, str]], escape: bool, **template_kwargs) -> list[int]:
    """The chat template applied to ``messages``, as token ids. ``escape``: special-token strings inside the
    contents become plain-text tokens, the template's own control tokens stay control tokens. Each such
    string is swapped for a private-use character before templating (so the template treats it as text), the
    rendered text is cut at the template's special tokens, and each piece between them is swapped back and
    tokenised with ``split_special_tokens``. The tokenizer too tokenises the text between special tokens
    piece by piece, so clean text gives the same ids either way (tests/test_data.py checks it for SmolLM2)."""
    if not escape:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pattern, tokens = _specials(tokenizer)
    hide = {t: chr(PRIVATE_USE + i) for i, t in enumerate(tokens)}
    reveal = {PRIVATE_USE + i: t for i, t in enumerate(tokens)}
    hidden = [{**m, "content": pattern.sub(lambda f: hide[f.group(1)], m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(hidden, tokenize=False, **template_kwargs)
    ids = []
    for i, piece in enumerate(pattern.split(text)):
        if i % 2:  # split puts the template's special tokens at odd positions
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            piece = piece.translate(reveal)
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def render_prompt_ids(tokenizer, messages: list[dict[str, str]], *, escape: bool = False) -> list[int]:
    """Token ids of the chat template applied to ``messages`` with the generation prompt appended.
    ``escape``: special-token strings inside the messages are tokenised as plain text."""
    return _chat_ids(tokenizer, messages, escape, add_generation_prompt=True)


def render_response_ids(tokenizer, messages: list[dict[str, str]], response: str,
                        prompt_ids: list[int] | None = None, *, escape: bool = False) -> list[int]:
    """Token ids of y* as the template writes an assistant turn, ending at the end-of-turn token."""
    prompt_ids = render_prompt_ids(tokenizer, messages, escape=escape) if prompt_ids is None else prompt_ids
    full = _chat_ids(tokenizer, messages + [{"role": "assistant", "content": response}], escape)
    eos = tokenizer.eos_token_id
    if full[: len(prompt_ids)] == prompt_ids:
        ids = full[len(prompt_ids):]
        if eos in ids:
            ids = ids[: len(ids) - ids[::-1].index(eos)]  # cut what follows the last end-of-turn token
        else:
            ids = ids + [eos]
    else:  # a template that rewrites earlier turns: fall back to plain text + eos
        ids = tokenizer(response, add_special_tokens=False, split_special_tokens=escape)["input_ids"] + [eos]
    return ids


def _holds_special_tokens(tokenizer, demo: Demonstration, rules: TruncationRules, response_field: str) -> bool:
    """Whether some text of ``demo`` holds a special token's string; a DataError naming the field and the
    token unless ``rules.on_special_tokens`` is ``escape``."""
    pattern, _ = _specials(tokenizer)
    texts = [(f"prompt[{i}]", m["content"]) for i, m in enumerate(demo.prompt)]
    for field, text in texts + [(response_field, demo.response)]:
        found = pattern.search(text)
        if found and rules.on_special_tokens != "escape":
            raise DataError(demo.source, demo.row, field,
                            f"text contains {found.group(1)!r}, a special token of the tokenizer: it would be "
                            "read as a control token (a forged turn or an end of turn). Remove it from the data, "
                            "or set data.on_special_tokens=escape to tokenise it as plain text", "special_token")
        if found:
            return True
    return False


def encode_demonstration(tokenizer, demo: Demonstration, rules: TruncationRules, *,
                         response_field: str = "response") -> Encoded:
    """Tokenise one demonstration under ``rules``; raises DataError (kind ``prompt_too_long`` /
    ``response_too_long`` / ``special_token``) when a rule says error or skip (the caller counts skips).
    ``response_field``: the response's name in errors (``chosen`` / ``rejected`` for preferences)."""
    # only rows that hold special-token text take the escape path: clean rows tokenise exactly as before
    escape = _holds_special_tokens(tokenizer, demo, rules, response_field)
    messages = list(demo.prompt)
    prompt_ids = render_prompt_ids(tokenizer, messages, escape=escape)
    first = 1 if messages[0]["role"] == "system" else 0
    while (len(prompt_ids) > rules.max_prompt_tokens and rules.prompt_overflow == "drop_turns"
           and len(messages) - first > 1):
        del messages[first]  # the oldest turn; the system message and the last user turn stay
        if messages[first]["role"] == "assistant":
            del messages[first]  # keep the history starting on a user turn
        prompt_ids = render_prompt_ids(tokenizer, messages, escape=escape)
    if len(prompt_ids) > rules.max_prompt_tokens:
        raise DataError(demo.source, demo.row, "prompt",
                        f"prompt is {len(prompt_ids)} tokens, longer than max_prompt_tokens="
                        f"{rules.max_prompt_tokens} (set prompt_overflow to skip or drop_turns, or raise the limit)",
                        "prompt_too_long")
    response_ids = render_response_ids(tokenizer, messages, demo.response, prompt_ids, escape=escape)
    truncated = len(response_ids) > rules.max_response_tokens
    if truncated and rules.response_overflow != "truncate":
        raise DataError(demo.source, demo.row, "response",
                        f"response is {len(response_ids)} tokens, longer than max_response_tokens="
                        f"{rules.max_response_tokens}", "response_too_long")
    return Encoded(prompt_ids, response_ids[: rules.max_response_tokens], truncated, demo.source, demo.row,
                   messages)


def _encode_all(items: Sequence, encode_one: Callable, rules: TruncationRules, what: str) -> tuple[list, dict]:
    """Encode each item; a DataError whose rule says skip is counted by kind, any other propagates."""
    out, skipped, first_bad = [], Counter(), ""
    for item in items:
        try:
            out.append(encode_one(item))
        except DataError as e:
            policy = {"prompt_too_long": rules.prompt_overflow, "response_too_long": rules.response_overflow}
            policy = policy.get(e.kind, rules.on_bad_row)
            if policy == "drop_turns":  # dropping turns was not enough: the last user turn alone is too long
                policy = rules.on_bad_row
            if policy != "skip":
                raise
            skipped[e.kind] += 1
            if e.kind not in LENGTH_KINDS:
                first_bad = first_bad or str(e)
    if not out:
        raise DataError(f"{what}s", None, None, f"every {what} was skipped ({dict(skipped)})", "empty_dataset")
    bad = {k: n for k, n in skipped.items() if k not in LENGTH_KINDS}
    if bad:
        check_skip_fraction(items[0].source or f"{what}s", what, bad, len(items), rules.max_skip_fraction,
                            first_bad)
    return out, dict(skipped)


def encode_demonstrations(tokenizer, demos: Sequence[Demonstration], rules: TruncationRules
                          ) -> tuple[list[Encoded], dict[str, int]]:
    """Tokenise many; returns (encoded, skipped counts by kind). Errors propagate unless the matching
    policy (prompt_overflow / response_overflow / on_bad_row) is ``skip``; more than
    ``rules.max_skip_fraction`` bad rows is an error."""
    return _encode_all(demos, lambda d: encode_demonstration(tokenizer, d, rules), rules, "demonstration")


def encode_preference(tokenizer, p: Preference, rules: TruncationRules) -> EncodedPreference:
    """Tokenise one (x, y_w, y_l) under ``rules``, both responses as ``encode_demonstration`` would."""
    w = encode_demonstration(tokenizer, Demonstration(p.prompt, p.chosen, p.source, p.row), rules,
                             response_field="chosen")
    lo = encode_demonstration(tokenizer, Demonstration(p.prompt, p.rejected, p.source, p.row), rules,
                              response_field="rejected")
    return EncodedPreference(w.prompt_ids, w.response_ids, lo.response_ids, p.source, p.row, w.messages)


def encode_preferences(tokenizer, prefs: Sequence[Preference], rules: TruncationRules
                       ) -> tuple[list[EncodedPreference], dict[str, int]]:
    """Tokenise preference triples under ``rules``; skips and errors as ``encode_demonstrations``."""
    return _encode_all(prefs, lambda p: encode_preference(tokenizer, p, rules), rules, "preference pair")


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


def length_sorted_batches(seqs, size: int, pad_id: int) -> Iterator[tuple[list[int], TokenBatch]]:
    """``seqs`` (a ``SequenceBatch``) in micro-batches of ``size`` cut from its length order (``by_length``,
    the least padding): each batch's row indices into ``seqs`` and its collated tokens."""
    order = seqs.by_length()
    for i in range(0, len(seqs), size):
        rows = order[i:i + size]
        yield rows, collate([seqs.prompts[j] for j in rows], [seqs.responses[j] for j in rows], pad_id)
