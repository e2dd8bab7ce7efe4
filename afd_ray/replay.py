"""Loop state that is checkpointed with the models: the data cursor and the demo-vs-sample pair replay."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afd_ray.data.tokenize import Encoded
from afd_ray.types import PairBatch, SequenceBatch


@dataclass
class DataCursor:
    """Walks a seeded permutation of ``size`` items, reshuffling each epoch; resumable from (epoch, pos)."""

    size: int
    seed: int = 0
    epoch: int = 0
    pos: int = 0

    def _order(self) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            out.append(order[self.pos])
            self.pos += 1
        return out


@dataclass
class PairReplay:
    """Demo-vs-sample pairs of every iteration: (iteration, demo index, sampled response ids).

    ``window(w)``: the pairs of the last w iterations (w = -1: all, as the seeds' code replays all;
    0: only the newest iteration)."""

    pairs: list[tuple[int, int, list[int]]] = field(default_factory=list)

    def add(self, iteration: int, demo_index: list[int], responses: list[list[int]]) -> None:
        self.pairs += [(iteration, d, r) for d, r in zip(demo_index, responses)]

    def window(self, iteration: int, w: int) -> list[tuple[int, int, list[int]]]:
        if w < 0:
            return list(self.pairs)
        return [p for p in self.pairs if p[0] > iteration - max(w, 1)]

    @staticmethod
    def batch(pairs: list[tuple[int, int, list[int]]], demos: list[Encoded]) -> PairBatch:
        """chosen = the demonstration (x, y*), rejected = the policy's sample (x, y') for the same x."""
        prompts = [demos[d].prompt_ids for _, d, _ in pairs]
        return PairBatch(chosen=SequenceBatch(prompts, [demos[d].response_ids for _, d, _ in pairs]),
                         rejected=SequenceBatch(prompts, [r for _, _, r in pairs]))
