"""Dataclasses that cross actor boundaries. Token ids travel as lists (ragged); batches as tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class SamplingSpec:
    """How the rollout workers sample. n responses per prompt; seed makes a call repeatable."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None


@dataclass
class Samples:
    """Rollouts of P prompts x n responses, prompt-major (sample j of prompt i at i * n + j).

    prompt_ids: P lists of prompt token ids; response_ids: P*n lists of sampled token ids (ending with eos
    unless cut at max_tokens); logprobs: P*n lists of log pi_old(y_t) as the sampler saw them.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    n: int

    def prompt_of(self, k: int) -> list[int]:
        return self.prompt_ids[k // self.n]


@dataclass
class SequenceBatch:
    """Prompt + response token sequences for scoring or log-probs (ragged; the receiver pads).

    prompts[i], responses[i]: token ids of sequence i. The log-probs returned for it are over responses[i].
    """

    prompts: list[list[int]]
    responses: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, rank: int, world_size: int) -> SequenceBatch:
        return SequenceBatch(self.prompts[rank::world_size], self.responses[rank::world_size])

    def by_length(self) -> list[int]:
        """Indices from shortest to longest sequence (stable): micro-batches cut from this order carry the
        least padding (W1's 128 samples on SmolLM2: forward + backward 25.3 s -> 21.6 s, docs/LOG.md)."""
        return sorted(range(len(self)), key=lambda i: len(self.prompts[i]) + len(self.responses[i]))


@dataclass
class PolicyBatch:
    """One policy step's data. The learner is algorithm-blind: ``objective`` names the loss and the
    fields it needs are set; credit assignment happened on the driver.

    objective: "pg" (PPO clipped ratio on advantages; with one epoch on-policy it is REINFORCE),
      "sft" (token NLL), "dpo" (pairs: sequences 2i and 2i+1 are chosen/rejected).
    seqs: the sequences; advantages: (B,) sequence advantages for pg; old_logp / ref_logp: per sequence
    lists of per-token log-probs (sampler's / reference's) over the response; kl_coef: KL-in-loss weight
    (0 when the KL is folded into the reward); ref_seq_logp: (B,) reference sequence log-probs for dpo;
    token_advantages: per sequence lists of per-token advantages (ppo with a critic; used instead of
    ``advantages``); returns: per-token value targets that came with them (for the critic's update);
    beta: the DPO beta (IPO's tau for loss_type "ipo"); loss_type: "dpo" or "ipo"; nll_coef: weight of the
    chosen responses' per-token NLL added to the DPO loss (TRL's rpo_alpha); pair_weight: (P,) weight of each
    pair's DPO term (SPAC); sft_seqs / sft_coef: demonstrations whose per-token NLL, times sft_coef, joins
    the DPO loss in the same optimizer step (seeds/004's RPO).
    is_weight: per sequence lists of per-token importance weights min(pi_old / pi_engine, C) on the pg loss
    (None: the samples came from pi_old itself).
    """

    objective: str
    seqs: SequenceBatch
    advantages: torch.Tensor | None = None
    old_logp: list[list[float]] | None = None
    ref_logp: list[list[float]] | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    ref_seq_logp: torch.Tensor | None = None
    beta: float = 0.1
    loss_type: str = "dpo"
    nll_coef: float = 0.0
    pair_weight: torch.Tensor | None = None
    sft_seqs: SequenceBatch | None = None
    sft_coef: float = 1.0
    clip_eps: float = 0.2
    dual_clip: float | None = None
    token_advantages: list[list[float]] | None = None
    returns: list[list[float]] | None = None
    is_weight: list[list[float]] | None = None

    def split(self, parts: int) -> list[PolicyBatch]:
        """``parts`` mini-batches of contiguous rows (whole DPO pairs; with prompt-major samples and
        parts dividing the prompt count, whole prompt groups)."""
        unit = 2 if self.objective == "dpo" else 1
        n = len(self.seqs) // unit
        m = len(self.sft_seqs) if self.sft_seqs is not None else 0
        out = []
        for k in range(parts):
            lo, hi = k * n // parts * unit, (k + 1) * n // parts * unit
            if hi == lo:
                continue
            pick = list(range(lo, hi))
            d_lo, d_hi = k * m // parts, (k + 1) * m // parts  # the demonstrations (RPO) in step with the pairs
            out.append(dataclasses.replace(
                self, seqs=SequenceBatch(self.seqs.prompts[lo:hi], self.seqs.responses[lo:hi]),
                advantages=None if self.advantages is None else self.advantages[pick],
                old_logp=None if self.old_logp is None else self.old_logp[lo:hi],
                ref_logp=None if self.ref_logp is None else self.ref_logp[lo:hi],
                token_advantages=None if self.token_advantages is None else self.token_advantages[lo:hi],
                returns=None if self.returns is None else self.returns[lo:hi],
                is_weight=None if self.is_weight is None else self.is_weight[lo:hi],
                ref_seq_logp=None if self.ref_seq_logp is None else self.ref_seq_logp[pick],
                pair_weight=None if self.pair_weight is None else self.pair_weight[lo // unit:hi // unit],
                sft_seqs=None if self.sft_seqs is None else SequenceBatch(self.sft_seqs.prompts[d_lo:d_hi],
                                                                          self.sft_seqs.responses[d_lo:d_hi])))
        return out


@dataclass
class PairBatch:
    """Reward-model training pairs: chosen[i] should score above rejected[i] (pairwise) or, for the
    discriminator loss, chosen are positives and rejected negatives. weight: (C,) per-pair weights
    (AIHF mixes demo pairs and preference pairs with gamma / alpha)."""

    chosen: SequenceBatch
    rejected: SequenceBatch
    weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)
