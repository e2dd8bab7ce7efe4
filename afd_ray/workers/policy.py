"""PolicyLearner: DeepSpeed ranks of pi_theta. Verbs: logprobs, update, init_weight_transfer, send_weights,
save, load. Algorithm-blind: the driver sends a PolicyBatch whose objective is "pg"
(PPO clipped ratio on driver-computed advantages), "sft" or "dpo"."""

from __future__ import annotations

import torch

from afd_ray import faults
from afd_ray.algo import losses
from afd_ray.algo.kl import kl_per_token
from afd_ray.algo.masked import batch_mean, masked_mean, masked_sum
from afd_ray.types import PolicyBatch, SequenceBatch
from afd_ray.workers.deepspeed_rank import DeepSpeedRank


class PolicyLearner(DeepSpeedRank):
    @torch.no_grad()
    def logprobs(self, seqs: SequenceBatch) -> list[list[float]]:
        """Per-token log pi over each response of this rank's shard (``rank::world_size``)."""
        self.engine.eval()
        mine = seqs.shard(self.rank, self.world_size)
        order, out = mine.by_length(), [None] * len(mine)
        for idx in self._micro_batches(len(mine)):
            rows = [order[i] for i in idx]
            b, empty = self._batch(mine, rows)
            logp, mask = self._token_logp(b)
            for j, lp, m in zip(rows, logp, mask):
                out[j] = lp[m.bool()].tolist()
        return out

    # ---- policy update --------------------------------------------------------------------------------------

    def update(self, batch: PolicyBatch) -> dict[str, float]:
        """One optimizer step of ``batch.objective`` on this rank's shard."""
        faults.point("policy.update")
        if batch.objective == "dpo":
            return self._update_dpo(batch)
        n = len(batch.seqs)
        # this rank's sequences, shortest first (one optimizer step: the order of micro-batches is free)
        local = list(range(self.rank, n, self.world_size))
        mine = [local[i] for i in batch.seqs.shard(self.rank, self.world_size).by_length()]
        seqs = SequenceBatch([batch.seqs.prompts[i] for i in mine], [batch.seqs.responses[i] for i in mine])
        n_tokens = self._all_reduce([sum(len(r) for r in seqs.responses)])[0]
        denom = n_tokens / self.world_size  # DeepSpeed averages over ranks: scale back to a global mean

        def pad_rows(rows, idx, b):
            return self._response_rows([rows[mine[i]] for i in idx], b)

        def micro(idx):
            b, empty = self._batch(seqs, idx)
            logp, mask = self._token_logp(b)
            if empty:
                mask = mask * 0
            if batch.objective == "sft":
                return losses.sft_loss(logp, mask, denom=denom), {}
            if batch.token_advantages is not None:
                adv_BT = pad_rows(batch.token_advantages, idx, b) if not empty else torch.zeros_like(logp)
            else:
                adv = (batch.advantages[[mine[i] for i in idx]] if not empty else torch.zeros(1)).to(self.device)
                adv_BT = adv.view(-1, 1).expand_as(logp)
            old = pad_rows(batch.old_logp, idx, b) if batch.old_logp is not None else logp.detach()
            w = pad_rows(batch.is_weight, idx, b) if batch.is_weight is not None and not empty else None
            loss, st = losses.ppo_clip_loss(logp, old, adv_BT, mask, batch.clip_eps,
                                            dual_clip=batch.dual_clip, denom=denom, is_weight_BT=w)
            stats = {"clipfrac": float(st["clipfrac"]) * float(mask.sum()) / denom / self.world_size}
            if batch.ref_logp is not None:
                kl = kl_per_token(logp, pad_rows(batch.ref_logp, idx, b), batch.kl_estimator)
                kl_term = masked_mean(kl, mask, denom=denom)
                if batch.kl_coef:
                    loss = loss + batch.kl_coef * kl_term
                stats["kl"] = float(kl_term.detach()) / self.world_size
            return loss, stats

        return self._step(micro, len(seqs))

    def _update_dpo(self, batch: PolicyBatch) -> dict[str, float]:
        n_pairs = len(batch.seqs) // 2
        mine = list(range(self.rank, n_pairs, self.world_size))
        denom = n_pairs / self.world_size
        rows = [k for i in mine for k in (2 * i, 2 * i + 1)]
        seqs = SequenceBatch([batch.seqs.prompts[k] for k in rows], [batch.seqs.responses[k] for k in rows])
        ref = batch.ref_seq_logp
        weight = batch.pair_weight
        # the demonstrations' NLL in the same optimizer step (RPO), this rank's share, a global token mean
        demos = batch.sft_seqs.shard(self.rank, self.world_size) if batch.sft_seqs is not None else None
        n_demo = len(demos) if demos is not None else 0
        demo_denom = (self._all_reduce([sum(map(len, demos.responses))])[0] / self.world_size) if demos else None

        def pairs(pair_idx):
            b, empty = self._batch(seqs, [k for i in pair_idx for k in (2 * i, 2 * i + 1)] or [])
            logp, mask = self._token_logp(b)
            seq_logp = masked_sum(logp, mask)
            if empty:
                return seq_logp.sum() * 0, {}
            r = torch.tensor([ref[rows[2 * i]] for i in pair_idx] + [ref[rows[2 * i + 1]] for i in pair_idx],
                             device=self.device).view(2, -1)
            w = weight[[mine[i] for i in pair_idx]].to(self.device) if weight is not None else None
            pair_loss = losses.ipo_loss if batch.loss_type == "ipo" else losses.dpo_loss
            loss, st = pair_loss(seq_logp[0::2], seq_logp[1::2], r[0], r[1], batch.beta, denom=denom, weight_B=w)
            if batch.nll_coef:  # keep the chosen responses likely while the margin grows (TRL's rpo_alpha)
                nll_B = -seq_logp[0::2] / mask[0::2].sum(1).clamp(min=1)
                loss = loss + batch.nll_coef * batch_mean(nll_B, denom)
            return loss, {"accuracy": float(st["accuracy"]) * len(pair_idx) / n_pairs,
                          "margin": float((st["reward_chosen"] - st["reward_rejected"]).sum()) / n_pairs}

        def micro(idx):
            pair_idx = [i for i in idx if i < len(mine)]
            demo_idx = [i - len(mine) for i in idx if i >= len(mine)]
            loss, stats = pairs(pair_idx) if pair_idx or not demo_idx else (0.0, {})
            if demo_idx:
                b, _ = self._batch(demos, demo_idx)
                logp, mask = self._token_logp(b)
                nll = losses.sft_loss(logp, mask, denom=demo_denom)
                loss = loss + batch.sft_coef * nll
                stats = stats | {"demo_nll": float(nll.detach()) / self.world_size}
            return loss, stats

        return self._step(micro, len(mine) + n_demo)

    # ---- weight sync through vLLM's weight-transfer API (afd_ray/workers/transfer.py) -----------------------

    def init_weight_transfer(self, backend: str, master_addr: str, port: int, world_size: int, engines: list,
                             tp: int, timeout_s: float | None) -> None:
        """Every rank: build the trainer-side engine of ``backend`` (rank 0 is the sender and drives the
        engines through the client; the others join the gathers, and for ``ipc`` the handle all-gather)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from afd_ray.workers.transfer import EngineClient, LearnerSource, trainer_init_info

        info = trainer_init_info(backend, self.rank, master_addr, port, world_size, timeout_s or 600.0)
        self._transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=EngineClient(engines, tp, timeout_s),
            source=LearnerSource(self.engine.module, zero3=self.spec.zero_stage == 3))

    @torch.no_grad()
    def send_weights(self, version: int) -> None:
        """Every rank: one full update round; the engines record ``version`` (the learner step)."""
        self.engine.eval()
        self._transfer.client.version = version
        self._transfer.send_weights()
