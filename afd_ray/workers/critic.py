"""CriticLearner: DeepSpeed ranks of the value model V_psi (backbone + scalar head) for PPO with a critic.
Verbs: values, update, save, load. Values and targets are per response token, aligned with the policy's
log-probs: the value of the state from which response token t is generated."""

from __future__ import annotations

import torch

from afd_ray.algo.losses import value_loss
from afd_ray.types import SequenceBatch
from afd_ray.workers.deepspeed_rank import DeepSpeedRank


class CriticLearner(DeepSpeedRank):
    KIND = "reward"  # a backbone with a scalar head, read at every position

    def _values(self, b):
        from afd_ray.models.loading import token_values

        v = token_values(self.engine.module, b.input_ids, b.attention_mask)[:, :-1]
        return v, b.shifted_mask.float()

    @torch.no_grad()
    def values(self, seqs: SequenceBatch) -> list[list[float]]:
        """V per response token of each sequence in this rank's shard."""
        self.engine.eval()
        mine = seqs.shard(self.rank, self.world_size)
        out = []
        for idx in self._micro_batches(len(mine)):
            b, empty = self._batch(mine, idx)
            v, mask = self._values(b)
            if not empty:
                out += [row[m.bool()].tolist() for row, m in zip(v, mask)]
        return out

    def update(self, seqs: SequenceBatch, returns: list[list[float]], old_values: list[list[float]],
               clip: float = 0.0, coef: float = 1.0) -> dict[str, float]:
        """One optimizer step of ``coef`` * the clipped value loss on this rank's shard."""
        n = len(seqs)
        mine = list(range(self.rank, n, self.world_size))
        local = SequenceBatch([seqs.prompts[i] for i in mine], [seqs.responses[i] for i in mine])
        n_tokens = self._all_reduce([sum(len(r) for r in local.responses)])[0]
        denom = n_tokens / self.world_size

        def rows(values, idx, b):
            return self._response_rows([values[mine[i]] for i in idx], b)

        def micro(idx):
            idx = list(idx)
            b, empty = self._batch(local, idx)
            v, mask = self._values(b)
            if empty:
                return (v * 0).sum(), {}
            ret, old = rows(returns, idx, b), rows(old_values, idx, b)
            loss = value_loss(v, old, ret, mask, clip, denom=denom)
            err = float((((v.detach() - ret) ** 2) * mask).sum()) / denom / self.world_size
            return coef * loss, {"value_mse": err}

        return self._step(micro, len(mine))
