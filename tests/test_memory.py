"""Memory and compute options of the learners (large models): the DeepSpeed config of each offload choice,
gradient checkpointing and ZeRO offload leaving a learner step's numbers unchanged, the colocated-residency verbs
``offload_states`` / ``reload_states``, and the reward step forwarding each distinct sequence once. The learners run in this process (rank 0 of 1, gloo), without Ray.

On CPU the residency verbs are no-ops by design; what is checked here is that DeepSpeed's own buffer moves
(``engine.offload_states``), which they call on a GPU, leave training unchanged. Bytes freed on a GPU, pinned
copies and the by-hand moves of tensors that live on a GPU are checked by benchmarks/gpu_check.py."""

import os
import socket

import pytest
import torch

from afd_ray.types import PairBatch, PolicyBatch, SequenceBatch
from afd_ray.workers.deepspeed_rank import LearnerSpec, ds_config

SEQS = SequenceBatch([[1, 5, 9, 11], [1, 7], [1, 3, 4]], [[20, 21, 2], [30, 2], [40, 41, 42, 2]])
REJECTED = SequenceBatch(SEQS.prompts, [[50, 2], [51, 52, 2], [53, 2]])


def test_ds_config_of_each_offload_choice():
    none = ds_config(4, 2, 1.0, 2, "bfloat16")
    assert none["train_batch_size"] == 8 and none["bf16"] == {"enabled": True}
    assert "offload_optimizer" not in none["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in none
    opt = ds_config(4, 2, 1.0, 2, "float32", offload="optimizer")["zero_optimization"]
    assert opt["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and "offload_param" not in opt
    full = ds_config(4, 2, 1.0, 3, "float32", offload="all")
    assert full["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert full["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert full["zero_force_ds_cpu_optimizer"] is False  # torch AdamW is accepted where CPU Adam cannot build
    with pytest.raises(ValueError, match="needs ZeRO-3"):
        ds_config(4, 2, 1.0, 2, "float32", offload="all")
    with pytest.raises(ValueError, match="offload='cpu' is not one of"):
        ds_config(4, 2, 1.0, 2, "float32", offload="cpu")
    sft = ds_config(4, 2, 1.0, 2, "float16", accumulation=3)  # the SFT job accumulates inside DeepSpeed
    assert sft["gradient_accumulation_steps"] == 3 and sft["train_batch_size"] == 24 and sft["fp16"]["enabled"]


@pytest.fixture(scope="module")
def in_process():
    """Ranks built in this process set the distributed env and a gloo group: restore the env afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _rank(cls, path, **spec):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return cls(LearnerSpec(str(path), **{"lr": 1e-3, "micro_batch_size": 2, **spec}), rank=0, world_size=1,
               master_addr="127.0.0.1", master_port=port)


def _steps(learner, n=2):
    from afd_ray.workers.reward import RewardLearner

    if isinstance(learner, RewardLearner):
        return [learner.update(PairBatch(SEQS, REJECTED)) for _ in range(n)]
    return [learner.update(PolicyBatch("sft", SEQS)) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("role, spec", [
    ("policy", {}),
    ("policy", {"lora_r": 4}),
    ("policy", {"zero_stage": 3}),
    ("reward", {"freeze_layers": 1}),  # frozen embeddings: the checkpointed blocks' inputs need a gradient
    ("reward", {"lora_r": 4}),
])
def test_gradient_checkpointing_leaves_loss_and_grad_norm_unchanged(in_process, tiny_llama_dir, role, spec):
    from afd_ray.models.loading import transformer_blocks
    from afd_ray.workers.policy import PolicyLearner
    from afd_ray.workers.reward import RewardLearner

    cls = PolicyLearner if role == "policy" else RewardLearner
    results, calls = {}, {}
    for checkpointing in (False, True):
        learner = _rank(cls, tiny_llama_dir, gradient_checkpointing=checkpointing, **spec)
        calls[checkpointing] = []
        block = transformer_blocks(learner.engine.module)[-1]
        block.register_forward_pre_hook(lambda *_, c=calls[checkpointing]: c.append(1))
        results[checkpointing] = _steps(learner)
    assert len(calls[True]) == 2 * len(calls[False]) > 0  # each block runs again in the backward pass
    assert not learner.engine.module.config.use_cache
    for a, b in zip(results[False], results[True]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, offload", [(2, "optimizer"), (3, "optimizer"), (3, "all")])
def test_zero_offload_steps_like_the_gpu_resident_optimizer(in_process, tiny_llama_dir, zero_stage, offload):
    from afd_ray.workers.policy import PolicyLearner

    plain = _steps(_rank(PolicyLearner, tiny_llama_dir, zero_stage=zero_stage), n=3)
    # DeepSpeedCPUAdam when its op compiles here (about 40 s, once per machine), else torch AdamW
    offloaded = _steps(_rank(PolicyLearner, tiny_llama_dir, zero_stage=zero_stage, offload=offload), n=3)
    for a, b in zip(plain, offloaded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_offload_and_reload_states(in_process, tiny_llama_dir, zero_stage):
    from afd_ray.workers.deepspeed_rank import _offload, _reload
    from afd_ray.workers.policy import PolicyLearner

    plain = _steps(_rank(PolicyLearner, tiny_llama_dir, zero_stage=zero_stage), n=3)
    learner = _rank(PolicyLearner, tiny_llama_dir, zero_stage=zero_stage)
    assert learner.offload_states() == 0 and learner._offloaded is None  # CPU: nothing to free
    assert learner.reload_states() == 0
    moved = []
    for _ in range(3):
        moved.append(learner.update(PolicyBatch("sft", SEQS)))
        # what offload_states does on a GPU, here with CPU-to-CPU moves: DeepSpeed's buffers are relinked
        _reload(learner.engine, _offload(learner.engine, zero_stage))
    for a, b in zip(plain, moved):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


@pytest.mark.slow
def test_reward_step_forwards_each_distinct_sequence_once(in_process, tiny_llama_dir):
    """Two prompts, each demonstration paired with its prompt's samples (4 and 2 of them): the step forwards
    the 2 demonstrations and 6 samples once each (8 rows, not 12) and its loss and gradient norm are those of
    Eq. 21a computed pair by pair."""
    from afd_ray.algo.losses import pairwise_reward_loss
    from afd_ray.data.tokenize import collate
    from afd_ray.models.loading import load_reward_model, reward_forward, transformer_blocks
    from afd_ray.workers.reward import RewardLearner

    (p1, d1), (p2, d2) = ([1, 5, 9], [20, 21, 2]), ([1, 7], [30, 2])
    chosen = SequenceBatch([p1] * 4 + [p2] * 2, [d1] * 4 + [d2] * 2)
    rejected = SequenceBatch(chosen.prompts, [[50, 2], [51, 52, 2], [53, 2], [54, 55, 56, 2], [57, 2], [58, 2]])
    learner = _rank(RewardLearner, tiny_llama_dir, micro_batch_size=8)
    rows = []
    transformer_blocks(learner.engine.module)[0].register_forward_pre_hook(
        lambda _, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    stats = learner.update(PairBatch(chosen, rejected))
    assert rows == [8]

    model = load_reward_model(str(tiny_llama_dir), seed=0)

    def score(seqs):
        b = collate(seqs.prompts, seqs.responses, 0)
        return reward_forward(model, b.input_ids, b.attention_mask)

    loss = pairwise_reward_loss(score(chosen), score(rejected))
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
