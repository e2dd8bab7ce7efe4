"""ReferenceServer: the frozen pi_ref. One verb: ``logprobs``. No optimizer, no DeepSpeed."""

from __future__ import annotations

import torch

from afd_ray.algo.masked import token_logprobs
from afd_ray.data.tokenize import collate
from afd_ray.types import SequenceBatch


class ReferenceServer:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8, pad_token_id: int = 0,
                 device: str = "cpu"):
        from afd_ray.models.loading import load_reference

        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = load_reference(model_path, dtype).to(self.device)
        self.micro_batch_size, self.pad_token_id = micro_batch_size, pad_token_id

    @torch.no_grad()
    def logprobs(self, seqs: SequenceBatch) -> list[list[float]]:
        """Per-token log pi_ref over each response, in order."""
        out = []
        for i in range(0, len(seqs), self.micro_batch_size):
            b = collate(seqs.prompts[i:i + self.micro_batch_size], seqs.responses[i:i + self.micro_batch_size],
                        self.pad_token_id)
            ids, attn = b.input_ids.to(self.device), b.attention_mask.to(self.device)
            logp = token_logprobs(self.model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
            out += [lp[m.bool()].tolist() for lp, m in zip(logp, b.shifted_mask.to(self.device))]
        return out
