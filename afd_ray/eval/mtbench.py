"""MT-Bench-style grading of a user-supplied question file: answers turn by turn, then single-answer
ratings 1-10 from a judge over an OpenAI-compatible endpoint (Zheng et al. 2023; seeds/002 reports
MT-Bench for UltraChat).

Question file (jsonl), one question per line:
    {"question_id": 81, "category": "writing", "turns": ["first user turn", "follow-up turn"]}
(a "reference" list of per-turn reference answers is optional and shown to the judge when present).

    questions = load_questions("mt_bench.jsonl")
    answers = answer_questions(chat_fn, questions)          # chat_fn(messages) -> assistant text
    grades = grade(JudgeClient(url, "gpt-4o"), questions, answers)
    grades.summary()                                        # mean rating per turn and per category, with s.e.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from afd_ray.data.schema import DataError
from afd_ray.eval.judge import JudgeClient, JudgeResult

SINGLE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Consider helpfulness, relevance, accuracy, depth and level of "
    "detail. {focus}Begin with a short explanation, then rate the response on a scale of 1 to 10 in exactly "
    "this format: \"Rating: [[5]]\".\n\n{conversation}")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]|rating\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str) -> float | None:
    """The last 'Rating: [[x]]' (or 'Rating: x') in the text when 1 <= x <= 10, else None."""
    found = [float(a or b) for a, b in _RATING.findall(text or "")]
    found = [x for x in found if 1 <= x <= 10]
    return found[-1] if found else None


@dataclass
class Question:
    question_id: str
    category: str
    turns: list[str]
    reference: list[str] = field(default_factory=list)


def load_questions(path: str | Path) -> list[Question]:
    """Read an MT-Bench-style jsonl; a bad line raises DataError naming file, line and field."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), i, None, f"not valid JSON: {e.msg}", "broken_json") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(str(path), i, "turns", "must be a non-empty list of non-empty strings", "wrong_type")
        out.append(Question(str(row.get("question_id", i)), str(row.get("category", "general")), turns,
                            list(row.get("reference") or [])))
    if not out:
        raise DataError(str(path), None, None, "no questions", "empty_dataset")
    return out


def answer_questions(chat_fn, questions: list[Question]) -> list[list[str]]:
    """Each question's answers, turn by turn: turn k is asked with the model's own earlier answers."""
    answers = []
    for q in questions:
        messages, mine = [], []
        for turn in q.turns:
            messages.append({"role": "user", "content": turn})
            reply = chat_fn(list(messages))
            messages.append({"role": "assistant", "content": reply})
            mine.append(reply)
        answers.append(mine)
    return answers


def _conversation(q: Question, answers: list[str], upto: int) -> str:
    parts = []
    for k in range(upto + 1):
        parts.append(f"[User turn {k + 1}]\n{q.turns[k]}\n\n[Assistant turn {k + 1}]\n{answers[k]}")
        if k < len(q.reference) and q.reference[k]:
            parts.append(f"[Reference answer for turn {k + 1}]\n{q.reference[k]}")
    return "\n\n".join(parts)


@dataclass
class Grades:
    """ratings[i][k]: the judge's 1-10 rating of question i's turn k (None when it gave none)."""

    questions: list[Question]
    ratings: list[list[float | None]]
    usage: JudgeResult

    def summary(self) -> dict[str, float]:
        def stats(xs):
            xs = [x for x in xs if x is not None]
            if not xs:
                return float("nan"), float("nan"), 0
            m = sum(xs) / len(xs)
            se = math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1) / len(xs))
            return m, se, len(xs)

        out: dict[str, float] = {}
        all_m, all_se, all_n = stats([r for rs in self.ratings for r in rs])
        out |= {"mean": all_m, "mean_se": all_se, "rated": float(all_n),
                "failed": float(sum(r is None for rs in self.ratings for r in rs))}
        for k in range(max(len(q.turns) for q in self.questions)):
            m, se, _ = stats([rs[k] for rs in self.ratings if k < len(rs)])
            out[f"turn{k + 1}"], out[f"turn{k + 1}_se"] = m, se
        for cat in sorted({q.category for q in self.questions}):
            m, _, _ = stats([r for q, rs in zip(self.questions, self.ratings) if q.category == cat for r in rs])
            out[f"category/{cat}"] = m
        out |= {"prompt_tokens": float(self.usage.prompt_tokens), "completion_tokens": float(self.usage.completion_tokens)}
        return out


def grade(client: JudgeClient, questions: list[Question], answers: list[list[str]]) -> Grades:
    """Single-answer grading of every turn (turn k is judged in the context of the turns before it)."""
    usage = JudgeResult()
    items = [(qi, k) for qi, q in enumerate(questions) for k in range(len(q.turns))]

    def one(_, item):
        qi, k = item
        q = questions[qi]
        focus = "Focus on the assistant's answer to the last user turn. " if k else ""
        content = SINGLE_TEMPLATE.format(focus=focus, conversation=_conversation(q, answers[qi], k))
        return client.ask([{"role": "user", "content": content}], parse_rating, usage)

    flat = client.map(one, items, "MT-Bench grading")
    ratings: list[list[float | None]] = [[None] * len(q.turns) for q in questions]
    for (qi, k), r in zip(items, flat):
        ratings[qi][k] = r
    return Grades(questions, ratings, usage)
