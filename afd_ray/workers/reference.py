"""ReferenceServer: the frozen pi_ref. One verb: ``logprobs``. No optimizer, no DeepSpeed."""

from __future__ import annotations

import torch

from afd_ray.data.tokenize import length_sorted_batches
from afd_ray.types import SequenceBatch


class ReferenceServer:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8, pad_token_id: int = 0,
                 device: str = "cpu"):
        from afd_ray.models.loading import load_reference, output_layer_splits

        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.model = load_reference(model_path, dtype).to(self.device)
        output_layer_splits(self.model)  # once, at load
        self.micro_batch_size, self.pad_token_id = micro_batch_size, pad_token_id

    @torch.no_grad()
    def logprobs(self, seqs: SequenceBatch) -> list[list[float]]:
        """Per-token log pi_ref over each response, in order (computed in micro-batches of similar length)."""
        from afd_ray.models.loading import response_logprobs

        out = [None] * len(seqs)
        for rows, b in length_sorted_batches(seqs, self.micro_batch_size, self.pad_token_id):
            mask = b.shifted_mask.to(self.device)
            logp = response_logprobs(self.model, b.input_ids.to(self.device), b.attention_mask.to(self.device), mask)
            for j, lp, m in zip(rows, logp, mask):
                out[j] = lp[m.bool()].tolist()
        return out
