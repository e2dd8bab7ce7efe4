"""Offline demonstration sets built from real conversations that PyPI packages ship (DESIGN.md Sec. 3).

- ``chatterbot``: chatterbot-corpus 1.3.3, English: 2,393 assistant turns from Q/A lists and short dialogues
  written for a chatbot persona (tech support, trivia, AI, coding, small talk).
- ``chitchat``: chitchat-dataset 0.9.0: 7,168 human-human conversations (BYU PCC); the first speaker is the
  user, the second the assistant; each assistant turn becomes one demonstration with up to
  ``CHITCHAT_HISTORY`` earlier messages as context.
- ``chitchat-questions``: the chitchat demonstrations whose answer asks the other person a question (holds a
  "?"; 27% of them, about 18,000): demonstrations that share a trait one can measure on any response,
  ``asks_question`` (a golden reward: the share of responses with the trait). Whether a policy picks the
  trait up from the demonstrations alone is the question the cpu preset and benchmarks/trait.py ask.

Each yields raw rows in the ``messages`` schema; the ordinary parser validates them like any file.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHITCHAT_HISTORY = 3
SETS = ("chatterbot", "chitchat", "chitchat-questions")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"offline set needs the PyPI package {pip_name} (`make venv` installs it)")
    return Path(spec.submodule_search_locations[0])


def _turns(texts: list[str], first_role: str = "user") -> Iterator[list[dict[str, str]]]:
    """For alternating texts, every prefix that ends on an assistant turn, as messages."""
    roles = ("user", "assistant") if first_role == "user" else ("assistant", "user")
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]
    for end, m in enumerate(messages):
        if m["role"] == "assistant" and end > 0:
            yield messages[: end + 1]


def chatterbot_rows() -> Iterator[tuple[str, dict[str, Any]]]:
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for c, conv in enumerate(data.get("conversations") or []):
            texts = [str(t).strip() for t in conv]
            for messages in _turns(texts):
                yield f"{path.name}#{c}.{len(messages) - 1}", {"messages": messages}


def chitchat_rows() -> Iterator[tuple[str, dict[str, Any]]]:
    path = _package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for conv_id in sorted(data):
        groups = data[conv_id]["messages"]
        texts = ["\n".join(u["text"].strip() for u in g) for g in groups]
        for messages in _turns(texts):
            # keep the answer and up to CHITCHAT_HISTORY messages before it, starting on a user turn
            context = messages[:-1][-CHITCHAT_HISTORY:]
            if context[0]["role"] != "user":
                context = context[1:]
            yield f"{conv_id}.{len(messages) - 1}", {"messages": context + messages[-1:]}


def asks_question(prompts: list[list[int]], responses: list[list[int]], tokenizer) -> list[float]:
    """The golden reward of ``chitchat-questions``: 1 where the response asks a question ("?"), else 0."""
    return [float("?" in tokenizer.decode(r, skip_special_tokens=True)) for r in responses]


def rows(name: str, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if kind != "demonstration":
        raise ValueError(f"offline:{name} holds demonstrations only; preferences need a file or a Hub dataset")
    if name == "chatterbot":
        return chatterbot_rows()
    if name == "chitchat":
        return chitchat_rows()
    if name == "chitchat-questions":
        return ((key, row) for key, row in chitchat_rows() if "?" in row["messages"][-1]["content"])
    raise ValueError(f"unknown offline set offline:{name}; choose one of {['offline:' + s for s in SETS]}")
