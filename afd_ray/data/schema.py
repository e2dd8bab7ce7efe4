"""Row schemas and their validation.

Demonstrations (y* = the last assistant turn):
  {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": y*}]}   UltraChat
  {"conversations": [{"from": "human", "value": ...}, ..., {"from": "gpt", "value": y*}]}       ShareGPT
  {"prompt": str | messages, "response": str}
  {"prompt": str, "label": str}                                                     TL;DR (label = y*)
  {"text": "\n\nHuman: ...\n\nAssistant: y*"}                                                  HH-RLHF text
  {"chosen": HH text | messages, "rejected": ...}          HH-RLHF pairs: the chosen side is the demonstration
  {"prompt": str | messages, "chosen": str, "rejected": str}                 preference rows: likewise
Preferences:
  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}   RewardBench / UltraFeedback
  {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}                             HH-RLHF text

Every problem raises ``DataError`` naming the source, the row and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ROLE_ALIASES = {
    "system": "system", "user": "user", "assistant": "assistant",
    "human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class DataError(ValueError):
    """A bad input row: says what is wrong and where (source, row, field)."""

    def __init__(self, source: str, row: int | str | None, field: str | None, problem: str, kind: str):
        self.source, self.row, self.field, self.problem, self.kind = source, row, field, problem, kind
        where = source + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class Demonstration:
    """One (x, y*) pair. prompt: chat messages ending with a user turn; response: y*, the expert's answer."""

    prompt: list[dict[str, str]]
    response: str
    source: str = ""
    row: int | str | None = None


@dataclass
class Preference:
    """One (x, y_w, y_l) triple: chosen y_w is preferred to rejected y_l for the prompt x."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = ""
    row: int | str | None = None


@dataclass
class Loaded:
    """Rows that parsed, and what was skipped (by problem kind) when bad rows are skipped."""

    items: list[Any]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class _Row:
    """A row being parsed, so every error names where it came from."""

    def __init__(self, data: Any, source: str, row: int | str | None):
        self.data, self.source, self.row = data, source, row

    def fail(self, field: str | None, problem: str, kind: str):
        raise DataError(self.source, self.row, field, problem, kind)

    def get(self, key: str, types: type | tuple[type, ...]):
        if key not in self.data or self.data[key] is None:
            self.fail(key, f"missing field '{key}' (row has {sorted(self.data)})", "missing_field")
        value = self.data[key]
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            self.fail(key, f"expected {names}, got {type(value).__name__}", "wrong_type")
        return value

    def messages(self, key: str, value: Any) -> list[dict[str, str]]:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            self.fail(key, f"expected a string or a list of messages, got {type(value).__name__}", "wrong_type")
        out = []
        for i, m in enumerate(value):
            where = f"{key}[{i}]"
            if not isinstance(m, dict):
                self.fail(where, f"expected a message object, got {type(m).__name__}", "wrong_type")
            role_key, content_key = ("role", "content") if "role" in m or "content" in m else ("from", "value")
            role, content = m.get(role_key), m.get(content_key)
            if role is None or content is None:
                self.fail(where, f"a message needs '{role_key}' and '{content_key}'", "missing_field")
            if not isinstance(role, str) or not isinstance(content, str):
                self.fail(where, "role and content must be strings", "wrong_type")
            if role.lower() not in ROLE_ALIASES:
                self.fail(f"{where}.{role_key}", f"unknown role {role!r}; allowed: {sorted(ROLE_ALIASES)}",
                          "unknown_role")
            out.append({"role": ROLE_ALIASES[role.lower()], "content": content})
        return out

    def check_prompt(self, key: str, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
        if not prompt or prompt[-1]["role"] != "user":
            self.fail(key, "the prompt must end with a user turn", "bad_prompt")
        if not prompt[-1]["content"].strip():
            self.fail(key, "the last user turn is empty", "empty_prompt")
        first = next(i for i, m in enumerate(prompt) if m["role"] != "system")
        if prompt[first]["role"] == "assistant":  # the template would render a turn nobody asked for
            self.fail(f"{key}[{first}]", "the conversation starts with an assistant turn; after any system "
                      "message the first turn must be the user's", "assistant_first")
        return prompt

    def check_response(self, key: str, text: str) -> str:
        if not text.strip():
            self.fail(key, "empty response", "empty_response")
        return text

    def split_last_assistant(self, key: str, messages: list[dict[str, str]]):
        if not messages or messages[-1]["role"] != "assistant":
            self.fail(key, "the conversation must end with an assistant turn (y*)", "no_response")
        return self.check_prompt(key, messages[:-1]), self.check_response(key, messages[-1]["content"])


def check_skip_fraction(source: str, what: str, bad: dict[str, int], total: int, max_skip_fraction: float,
                        first: str) -> None:
    """Stop when more than ``max_skip_fraction`` of ``total`` rows were skipped as bad: that many means a wrong
    file or field mapping, not a few broken rows. ``first``: the first bad row's error."""
    n = sum(bad.values())
    if n > max_skip_fraction * total:
        raise DataError(source, None, None, f"{n} of {total} {what} rows are bad {bad}, more than "
                        f"data.max_skip_fraction={max_skip_fraction}; first: {first}. Check the source and its "
                        "fields, or raise data.max_skip_fraction to skip them anyway", "too_many_bad_rows")


def parse_hh_text(text: str) -> list[dict[str, str]]:
    """HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") to messages. Raises ValueError if not HH text."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not HH-RLHF text: expected it to start with '\\n\\nHuman: '")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _hh(row: _Row, key: str) -> list[dict[str, str]]:
    try:
        return parse_hh_text(row.get(key, str))
    except ValueError as e:
        row.fail(key, str(e), "bad_format")


def parse_demonstration(data: Any, source: str, row: int | str | None) -> Demonstration:
    """One demonstration row in any supported schema (module docstring)."""
    r = _Row(data, source, row)
    if not isinstance(data, dict):
        r.fail(None, f"expected a JSON object, got {type(data).__name__}", "wrong_type")
    if "messages" in data or "conversations" in data:
        key = "messages" if "messages" in data else "conversations"
        prompt, response = r.split_last_assistant(key, r.messages(key, r.get(key, list)))
    elif "text" in data and "response" not in data:
        prompt, response = r.split_last_assistant("text", _hh(r, "text"))
    elif "label" in data and "response" not in data:  # TL;DR: the reference summary is y*
        prompt = r.check_prompt("prompt", r.messages("prompt", r.get("prompt", (str, list))))
        response = r.check_response("label", r.get("label", str))
    elif "chosen" in data and "response" not in data:  # preference rows (HH-RLHF, ...): the chosen side is y*
        value = r.get("chosen", (str, list))
        if "prompt" in data and isinstance(value, str):
            prompt = r.check_prompt("prompt", r.messages("prompt", r.get("prompt", (str, list))))
            response = r.check_response("chosen", value)
        else:
            prompt, response = r.split_last_assistant(
                "chosen", _hh(r, "chosen") if isinstance(value, str) else r.messages("chosen", value))
    elif "prompt" in data or "response" in data:
        prompt = r.check_prompt("prompt", r.messages("prompt", r.get("prompt", (str, list))))
        response = r.check_response("response", r.get("response", str))
    else:
        r.fail(None, f"no demonstration fields: expected 'messages', 'conversations', 'text', "
                     f"'prompt'+'response', 'prompt'+'label' (TL;DR) or 'chosen' (preference rows), got {sorted(data)}",
               "missing_field")
    return Demonstration(prompt, response, source, row)


def parse_preference(data: Any, source: str, row: int | str | None) -> Preference:
    """One preference row: prompt/chosen/rejected (strings or messages) or HH-RLHF text pairs."""
    r = _Row(data, source, row)
    if not isinstance(data, dict):
        r.fail(None, f"expected a JSON object, got {type(data).__name__}", "wrong_type")
    sides = {}
    for key in ("chosen", "rejected"):
        value = r.get(key, (str, list))
        if isinstance(value, str) and "prompt" not in data:
            sides[key] = r.split_last_assistant(key, _hh(r, key))
        elif isinstance(value, list):
            sides[key] = r.split_last_assistant(key, r.messages(key, value))
        else:
            sides[key] = (None, r.check_response(key, value))
    if "prompt" in data:
        prompt = r.check_prompt("prompt", r.messages("prompt", r.get("prompt", (str, list))))
    else:
        prompt = sides["chosen"][0]
        if sides["rejected"][0] != prompt:
            r.fail("rejected", "chosen and rejected continue different conversations", "bad_format")
    return Preference(prompt, sides["chosen"][1], sides["rejected"][1], source, row)
