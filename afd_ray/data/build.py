"""The run's data from its config: tokenised demonstrations and preference pairs, shuffled with the run
seed and split into (train, held-out). Every recipe reads its data here."""

from __future__ import annotations

import logging

import torch

from afd_ray import toy
from afd_ray.config import Config
from afd_ray.data.tokenize import Encoded, EncodedPreference, TruncationRules

log = logging.getLogger("afd_ray")


def _rules(cfg: Config) -> TruncationRules:
    d = cfg.data
    return TruncationRules(d.max_prompt_tokens, d.max_response_tokens, d.prompt_overflow, d.response_overflow,
                           d.on_bad_row, on_special_tokens=d.on_special_tokens, max_skip_fraction=d.max_skip_fraction)


def _shuffled(items: list, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order]


def build_data(cfg: Config, tokenizer) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenised demonstrations, shuffled with the run seed, split into (train, held-out)."""
    if cfg.data.demonstrations in toy.SOURCES:
        encoded = toy.make_demonstrations(tokenizer, cfg.data.limit or 1024, seed=cfg.run.seed,
                                          eos=toy.SOURCES[cfg.data.demonstrations])
    else:
        from afd_ray.data.readers import load_demonstrations
        from afd_ray.data.tokenize import encode_demonstrations

        loaded = load_demonstrations(cfg.data.demonstrations, cfg.data.split or None, cfg.data.on_bad_row,
                                     cfg.data.limit or None, max_skip_fraction=cfg.data.max_skip_fraction)
        encoded, skipped = encode_demonstrations(tokenizer, loaded.items, _rules(cfg))
        if loaded.num_skipped or skipped:
            log.warning("demonstrations: skipped %s while reading and %s while tokenising", loaded.skipped, skipped)
    encoded = _shuffled(encoded, cfg.run.seed)
    if len(encoded) <= cfg.data.heldout:
        raise ValueError(f"data.heldout={cfg.data.heldout} leaves no training demonstrations out of {len(encoded)}")
    return encoded[cfg.data.heldout:], encoded[: cfg.data.heldout]


def build_preferences(cfg: Config, tokenizer) -> tuple[list[EncodedPreference], list[EncodedPreference]]:
    """Tokenised preference pairs, shuffled with the run seed, split into (train, held-out)."""
    if cfg.data.preferences in toy.SOURCES:
        encoded = toy.make_preferences(tokenizer, cfg.data.limit or 1024, seed=cfg.run.seed,
                                       eos=toy.SOURCES[cfg.data.preferences])
    else:
        from afd_ray.data.readers import load_preferences
        from afd_ray.data.tokenize import encode_preferences

        loaded = load_preferences(cfg.data.preferences, cfg.data.split or None, cfg.data.on_bad_row,
                                  cfg.data.limit or None, max_skip_fraction=cfg.data.max_skip_fraction)
        encoded, skipped = encode_preferences(tokenizer, loaded.items, _rules(cfg))
        if loaded.num_skipped or skipped:
            log.warning("preferences: skipped %s while reading and %s while tokenising", loaded.skipped, skipped)
    encoded = _shuffled(encoded, cfg.run.seed + 1)
    k = min(cfg.data.heldout, len(encoded) // 2)
    return encoded[k:], encoded[:k]
