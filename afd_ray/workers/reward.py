"""RewardLearner: DeepSpeed ranks of r_phi (causal-LM backbone + scalar head). Verbs: score, update, save, load.
RewardServer: a fixed reward model (run.method=rlhf, Inverse-RLignment's RL stage), scored only."""

from __future__ import annotations

import torch

from afd_ray import faults
from afd_ray.algo.losses import discriminator_loss, pairwise_reward_loss
from afd_ray.data.tokenize import length_sorted_batches
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
        order, out = mine.by_length(), [0.0] * len(mine)
        for idx in self._micro_batches(len(mine)):
            rows = [order[i] for i in idx]
            b, empty = self._batch(mine, rows)
            r = reward_forward(self.engine.module, b.input_ids, b.attention_mask)
            for j, v in zip(rows, r.tolist()):
                out[j] = v
        return faults.corrupt("reward.score", torch.tensor(out)).tolist()  # tests: a reward model gone NaN

    def update(self, pairs: PairBatch, loss: str = "pairwise", margin: float = 0.0) -> dict[str, float]:
        """One optimizer step of the reward model on this rank's shard of ``pairs``: "pairwise" is
        ``pairwise_reward_loss`` (seeds/004 Eq. 21a; Eq. 13 on preference pairs; Eq. 24a with AIHF's per-pair
        weights), "discriminator" is ``discriminator_loss`` (seeds/000 Eq. 11) with chosen as positives and
        rejected as negatives."""
        from afd_ray.models.loading import reward_forward

        if loss not in ("pairwise", "discriminator"):
            raise ValueError(f"reward loss must be 'pairwise' or 'discriminator', got {loss!r}")
        n = len(pairs)
        mine = list(range(self.rank, n, self.world_size))
        chosen = SequenceBatch([pairs.chosen.prompts[i] for i in mine], [pairs.chosen.responses[i] for i in mine])
        rejected = SequenceBatch([pairs.rejected.prompts[i] for i in mine],
                                 [pairs.rejected.responses[i] for i in mine])
        weight = pairs.weight if pairs.weight is not None else torch.ones(n)
        denom = n / self.world_size  # DeepSpeed averages over ranks: scale back to the global mean

        def micro(idx):
            idx = list(idx)
            # one forward per distinct sequence: a demonstration is paired with each of its prompt's n samples
            # (and again in later iterations' replay), so it would otherwise be scored n times per micro-batch
            keys = [(tuple(s.prompts[i]), tuple(s.responses[i])) for s in (chosen, rejected) for i in idx]
            row = {k: j for j, k in enumerate(dict.fromkeys(keys))}
            distinct = SequenceBatch([list(k[0]) for k in row], [list(k[1]) for k in row])
            b, empty = self._batch(distinct, range(len(row)))
            r = reward_forward(self.engine.module, b.input_ids, b.attention_mask)
            at = torch.tensor([row[k] for k in keys] or [0, 0], device=r.device)
            rc, rr = r[at[: len(at) // 2]], r[at[len(at) // 2:]]
            # an empty micro-batch scores one dummy pair at weight 0, so every rank runs the same collectives
            w = weight[[mine[i] for i in idx]].to(self.device) if not empty else torch.zeros(1, device=self.device)
            if loss == "pairwise":
                value = pairwise_reward_loss(rc, rr, margin, weight_B=w, denom=denom)
            else:
                value = discriminator_loss(rc, rr, denom, denom, weight_pos_B=w, weight_neg_B=w)
            gap = (rc - rr).detach()
            acc = float(((gap > 0).float() * (w > 0)).sum()) / n
            return value, {"accuracy": acc, "reward_gap": float(gap.sum()) / n if not empty else 0.0}

        return self._step(micro, len(mine))


class RewardServer:
    """A fixed reward model: one verb, ``score``. No optimizer, no DeepSpeed: a frozen r held as a learner
    would carry fp32 master weights and AdamW moments it never uses (16 bytes a parameter, 112 GB for a 7B
    reward model), so like ``ReferenceServer`` it is the model in ``dtype`` alone, one replica per slot."""

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8, pad_token_id: int = 0,
                 device: str = "cpu"):
        from afd_ray.models.loading import load_reward_model

        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = load_reward_model(model_path, dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.micro_batch_size, self.pad_token_id = micro_batch_size, pad_token_id

    @torch.no_grad()
    def score(self, seqs: SequenceBatch) -> list[float]:
        """r(x, y) of each sequence, in order (computed in micro-batches of similar length)."""
        from afd_ray.models.loading import reward_forward

        out = [0.0] * len(seqs)
        for rows, b in length_sorted_batches(seqs, self.micro_batch_size, self.pad_token_id):
            r = reward_forward(self.model, b.input_ids.to(self.device), b.attention_mask.to(self.device))
            for j, v in zip(rows, r.tolist()):
                out[j] = v
        return faults.corrupt("reward.score", torch.tensor(out)).tolist()  # tests: a reward model gone NaN
