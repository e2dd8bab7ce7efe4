"""RewardLearner: DeepSpeed ranks of r_phi (causal-LM backbone + scalar head). Verbs: score, update, save, load."""

from __future__ import annotations

import torch

from afd_ray.types import PairBatch, SequenceBatch
from afd_ray.workers.deepspeed_rank import DeepSpeedRank


class RewardLearner(DeepSpeedRank):
    KIND = "reward"

    @torch.no_grad()
    def score(self, seqs: SequenceBatch) -> list[float]:
        """Reward r_phi(x, y) of each sequence in this rank's shard."""
        from afd_ray.models.loading import reward_forward

        self.engine.eval()
        mine = seqs.shard(self.rank, self.world_size)
        out = []
        for idx in self._micro_batches(len(mine)):
            b, empty = self._batch(mine, idx)
            r = reward_forward(self.engine.module, b.input_ids, b.attention_mask)
            if not empty:
                out += r.tolist()
        return out

    def update(self, pairs: PairBatch, loss: str = "pairwise", margin: float = 0.0) -> dict[str, float]:
        """One optimizer step of the reward model on this rank's shard of ``pairs``."""
        from afd_ray.models.loading import reward_forward

        n = len(pairs)
        mine = list(range(self.rank, n, self.world_size))
        chosen = SequenceBatch([pairs.chosen.prompts[i] for i in mine], [pairs.chosen.responses[i] for i in mine])
        rejected = SequenceBatch([pairs.rejected.prompts[i] for i in mine],
                                 [pairs.rejected.responses[i] for i in mine])
        weight = pairs.weight if pairs.weight is not None else torch.ones(n)
        denom = n / self.world_size

        def micro(idx):
            idx = list(idx)
            bc, empty = self._batch(chosen, idx)
            br, _ = self._batch(rejected, idx)
            rc = reward_forward(self.engine.module, bc.input_ids, bc.attention_mask)
            rr = reward_forward(self.engine.module, br.input_ids, br.attention_mask)
            w = weight[[mine[i] for i in idx]].to(self.device) if not empty else torch.zeros(1, device=self.device)
            if loss == "pairwise":  # seeds/004 Eq. 21a (per-pair weights for AIHF, Eq. 24a)
                per_pair = torch.nn.functional.softplus(-(rc - rr - margin))
            else:  # discriminator BCE, seeds/000 Eq. 11: positives = chosen, negatives = rejected
                per_pair = torch.nn.functional.softplus(-rc) + torch.nn.functional.softplus(rr)
            value = (w * per_pair).sum() / denom
            acc = float(((rc > rr).float() * (w > 0)).sum()) / n
            return value, {"accuracy": acc, "reward_gap": float((rc - rr).sum()) / n if not empty else 0.0}

        return self._step(micro, len(mine))

