"""The run's data from its config: tokenised demonstrations and preference pairs, shuffled with the run
seed and split into (train, held-out). Every recipe reads its data here."""

from __future__ import annotations

import logging

import torch

from afd_ray import toy
from afd_ray.config import Config
from afd_ray.data.readers import load_demonstrations, load_preferences
from afd_ray.data.tokenize import (
    Encoded,
    EncodedPreference,
    TruncationRules,
    encode_demonstrations,
    encode_preferences,
)

log = logging.getLogger("afd_ray")


def _rules(cfg: Config) -> TruncationRules:
    d = cfg.data
    return TruncationRules(d.max_prompt_tokens, d.max_response_tokens, d.prompt_overflow, d.response_overflow,
                           d.on_bad_row, on_special_tokens=d.on_special_tokens, max_skip_fraction=d.max_skip_fraction)


def _shuffled(items: list, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order]


def _encoded(cfg: Config, tokenizer, source: str, what: str, make_toy, load, encode) -> list:
    """The toy task's items for a toy source, else the file or Hub source read and tokenised."""
    if source in toy.SOURCES:
        return make_toy(tokenizer, cfg.data.limit or 1024, seed=cfg.run.seed, **toy.SOURCES[source])
    loaded = load(source, cfg.data.split or None, cfg.data.on_bad_row, cfg.data.limit or None,
                  max_skip_fraction=cfg.data.max_skip_fraction)
    encoded, skipped = encode(tokenizer, loaded.items, _rules(cfg))
    if loaded.num_skipped or skipped:
        log.warning("%s: skipped %s while reading and %s while tokenising", what, loaded.skipped, skipped)
    return encoded


def build_data(cfg: Config, tokenizer) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenised demonstrations, shuffled with the run seed, split into (train, held-out)."""
    encoded = _encoded(cfg, tokenizer, cfg.data.demonstrations, "demonstrations", toy.make_demonstrations,
                       load_demonstrations, encode_demonstrations)
    encoded = _shuffled(encoded, cfg.run.seed)
    if len(encoded) <= cfg.data.heldout:
        raise ValueError(f"data.heldout={cfg.data.heldout} leaves no training demonstrations out of {len(encoded)}")
    return encoded[cfg.data.heldout:], encoded[: cfg.data.heldout]


def build_preferences(cfg: Config, tokenizer) -> tuple[list[EncodedPreference], list[EncodedPreference]]:
    """Tokenised preference pairs, shuffled with the run seed, split into (train, held-out)."""
    encoded = _encoded(cfg, tokenizer, cfg.data.preferences, "preferences", toy.make_preferences,
                       load_preferences, encode_preferences)
    encoded = _shuffled(encoded, cfg.run.seed + 1)
    k = min(cfg.data.heldout, len(encoded) // 2)
    return encoded[k:], encoded[:k]
