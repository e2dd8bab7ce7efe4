"""Choosing among the n samples of a prompt: online-DPO pairs and Best-of-N (streamed in chunks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairSelection:
    """Online-DPO pairs, one per prompt.

    chosen_P, rejected_P: (P,) flat indices into the prompt-major (P * n,) sample batch.
    valid_P: (P,) bool, False where every sample of the prompt got the same reward (no signal).
    """

    chosen_P: torch.Tensor
    rejected_P: torch.Tensor
    valid_P: torch.Tensor


def select_online_dpo_pairs(reward_B: torch.Tensor, group_size: int, min_gap: float = 0.0) -> PairSelection:
    """Best vs worst sample by reward for each prompt (online DPO, seeds/002 policy step).

    reward_B: (P * n,) prompt-major rewards r_phi(x, y'). A prompt is valid when
    max - min > min_gap. Ties take the first index, so the choice is deterministic.
    """
    if group_size < 2 or reward_B.numel() % group_size:
        raise ValueError(f"online_dpo needs n >= 2 samples per prompt laid out prompt-major; got n={group_size} "
                         f"for {reward_B.numel()} rewards")
    r_PN = reward_B.float().view(-1, group_size)
    offset_P = torch.arange(r_PN.shape[0], device=r_PN.device) * group_size
    best_P, worst_P = r_PN.argmax(1), r_PN.argmin(1)
    gap_P = r_PN.max(1).values - r_PN.min(1).values
    return PairSelection(offset_P + best_P, offset_P + worst_P, gap_P > min_gap)


def best_of_n(reward_PN: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Index of the highest-reward sample among the first n of each prompt (seeds/000 Sec. 4, BoN).

    reward_PN: (P, N) rewards of N samples per prompt; n <= N (default N) so one pool of N samples
    yields the whole curve for n = 1, 2, 4, ... N. Returns (P,) indices in [0, n); n = 1 returns 0,
    i.e. plain sampling.
    """
    n = reward_PN.shape[1] if n is None else n
    if not 1 <= n <= reward_PN.shape[1]:
        raise ValueError(f"best_of_n: n must be in [1, {reward_PN.shape[1]}], got {n}")
    return reward_PN[:, :n].argmax(1)


@dataclass
class BestOfNState:
    """Running Best-of-N over chunks of samples, so N = 1000 never holds N responses per prompt.

    reward_P: (P,) best reward so far (-inf before any chunk); index_P: (P,) its sample index; seen: samples
    per prompt consumed so far.
    """

    reward_P: torch.Tensor
    index_P: torch.Tensor
    seen: int = 0

    @classmethod
    def empty(cls, num_prompts: int) -> BestOfNState:
        return cls(torch.full((num_prompts,), float("-inf")), torch.zeros(num_prompts, dtype=torch.long))

    def update(self, chunk_reward_PC: torch.Tensor) -> torch.Tensor:
        """Fold in the rewards of the next C samples of every prompt. Returns (P,) bool: where the chunk
        holds the new best (the caller keeps that chunk's response). Strictly greater, so the earliest
        sample wins ties, as in ``best_of_n``."""
        chunk_best_P, chunk_idx_P = chunk_reward_PC.float().max(1)
        improved_P = chunk_best_P > self.reward_P
        self.reward_P = torch.where(improved_P, chunk_best_P, self.reward_P)
        self.index_P = torch.where(improved_P, chunk_idx_P + self.seen, self.index_P)
        self.seen += chunk_reward_PC.shape[1]
        return improved_P
