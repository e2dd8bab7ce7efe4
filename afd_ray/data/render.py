"""(x, y) for a model that reads another input than the policy: a reward model or a golden reward model with
its own tokenizer or chat template. The policy samples token ids in its own template; such a model is scored
on the text, re-rendered in the format it was trained on:

- ``chat``: its own chat template, the prompt's chat messages plus the response as the assistant turn (as
  veRL re-renders for a reward model whose template differs; RM-Gemma-2B, Skywork, ArmoRM read so);
- ``hh``: Anthropic HH-RLHF text, ``"\\n\\nHuman: ...\\n\\nAssistant: y"`` (the GPT-2 reward models trained
  on HH, e.g. Ray2333/gpt2-large-harmless-reward_model, which have no chat template);
- ``pair``: the (prompt text, response text) pair of a cross-encoder (OpenAssistant's DeBERTa reward
  models); for golden reward models only (``afd_ray.eval.golden``).

The prompt's messages are looked up by its token ids in the run's data (``prompt_messages``); the
response is decoded without special tokens. A response cut at max_new_tokens (no end-of-turn token) stays
cut: its re-rendered form has no end-of-turn token either, so a cut response never reads as a finished one.
"""

from __future__ import annotations

from collections.abc import Sequence

from afd_ray.data.tokenize import render_prompt_ids, render_response_ids
from afd_ray.types import SequenceBatch

FORMATS = ("chat", "hh", "pair")
HH_ROLES = {"user": "Human", "assistant": "Assistant"}


def prompt_messages(*encoded: Sequence) -> dict[tuple[int, ...], list[dict[str, str]]]:
    """The chat messages of every prompt in ``encoded`` (lists of ``Encoded`` / ``EncodedPreference``),
    by the prompt's token ids; items without messages (the toy task's) are left out."""
    return {tuple(e.prompt_ids): e.messages for items in encoded for e in items if e.messages is not None}


def hh_text(messages: list[dict[str, str]]) -> str:
    """Anthropic HH-RLHF text of a conversation ending in a user turn, up to ``"\\n\\nAssistant:"``; a
    system message opens the text as it is."""
    parts = [m["content"] if m["role"] == "system" else f"\n\n{HH_ROLES[m['role']]}: {m['content']}"
             for m in messages]
    return "".join(parts) + "\n\nAssistant:"


def same_input(a, b) -> bool:
    """Whether two tokenizers read the same token ids the same way under the same chat template."""
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)


def resolve_format(fmt: str, source, target, what: str, fallback: str | None = None) -> str | None:
    """The format ``target`` is scored in, for the setting ``what`` = ``fmt``: None when it reads the
    policy's token ids as they are (``auto`` with the same vocabulary and template), ``auto`` otherwise its
    chat template, else ``fallback``; a ValueError naming the setting when there is none."""
    if fmt == "auto":
        if same_input(source, target):
            return None
        if not getattr(target, "chat_template", None):
            if fallback:
                return fallback
            raise ValueError(f"{what}=auto: the model's tokenizer or chat template differs from the policy's and "
                             f"it has no chat template to re-render (x, y) in; set {what} to one of {FORMATS} "
                             f"(hh: Anthropic HH text, as GPT-2 reward models trained on HH-RLHF read)")
        return "chat"
    if fmt not in FORMATS:
        raise ValueError(f"{what}={fmt!r}: must be auto or one of {FORMATS}")
    if fmt == "chat" and not getattr(target, "chat_template", None):
        raise ValueError(f"{what}=chat: the model's tokenizer has no chat template")
    return fmt


class Rerender:
    """Policy token ids -> ``target``'s token ids of the same (x, y) in ``fmt`` (``chat`` or ``hh``), or the
    (prompt, response) texts (``texts``, any format). ``prompts``: the chat messages by the policy's prompt
    ids (``prompt_messages``); ``what`` names the setting in errors."""

    def __init__(self, source, target, fmt: str, prompts: dict[tuple[int, ...], list[dict[str, str]]],
                 what: str = "reward.input_format"):
        if fmt not in FORMATS:
            raise ValueError(f"{what}={fmt!r}: must be one of {FORMATS}")
        self.source, self.target, self.fmt, self.prompts, self.what = source, target, fmt, prompts, what
        eos = getattr(source, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def messages(self, prompt_ids: Sequence[int]) -> list[dict[str, str]]:
        found = self.prompts.get(tuple(prompt_ids))
        if found is None:
            raise ValueError(f"{self.what}={self.fmt}: a prompt that is not in the run's data (chat messages "
                             f"unknown): {self.source.decode(list(prompt_ids)[:40])!r}...")
        return found

    def texts(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
              ) -> tuple[list[str], list[str]]:
        """Prompt texts (the user turn; HH text for several turns) and response texts."""
        ps = []
        for p in prompts:
            m = [x for x in self.messages(p) if x["role"] != "system"]
            ps.append(m[-1]["content"] if len(m) == 1 else hh_text(m).removesuffix("\n\nAssistant:").lstrip())
        return ps, self.source.batch_decode([list(r) for r in responses], skip_special_tokens=True)

    def one(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) in the target's format and vocabulary."""
        messages = self.messages(prompt_ids)
        text = self.source.decode(list(response_ids), skip_special_tokens=True)
        finished = bool(response_ids) and response_ids[-1] in self.eos_ids
        tok = self.target
        if self.fmt == "chat":
            p = render_prompt_ids(tok, messages, escape=True)
            r = render_response_ids(tok, messages, text, p, escape=True)
            if not finished and r and r[-1] == tok.eos_token_id:
                r = r[:-1]
            return p, r
        if self.fmt == "hh":
            p = tok(hh_text(messages), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            r = tok(" " + text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            return p, r
        raise ValueError(f"{self.what}={self.fmt}: a cross-encoder pair has no single token sequence; "
                         "use texts()")

    def batch(self, seqs: SequenceBatch) -> SequenceBatch:
        pairs = [self.one(p, r) for p, r in zip(seqs.prompts, seqs.responses)]
        return SequenceBatch([p for p, _ in pairs], [r for _, r in pairs])
