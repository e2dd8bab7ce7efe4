"""The paper presets hold the settings their seeds state: each row names the seed and the section it comes from
(values a seed leaves open are named as our choice in the preset's comments, and not checked here)."""

import pytest

from afd_ray.config import load_config

BOTH_HH = [  # seeds/000 App. E.6: "We keep all hyper-parameters the same across different methods" and tasks
    ("model.lora_r", 32, "seeds/000 App. E.6: LoRA-R 32"),
    ("model.lora_alpha", 32, "seeds/000 App. E.6: LoRA-alpha 32"),
    ("sft.micro_batch_size", 4, "seeds/000 App. E.6: mini-batch size 4"),
    ("sft.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("reward.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("sft.epochs", 2, "seeds/000 App. E.6: 2 epochs for SFT"),
    ("bon.rm_epochs", 2, "seeds/000 App. E.6: 2 epochs for reward models"),
    ("bon.data_choice", "init_sft", "seeds/000 Table 1: Init-SFT RM"),
    ("bon.n", 1000, "seeds/000 App. E.5: N = 1000 (the largest N)"),
]
PER_TASK = {  # key: (Harmless, Helpful, where)
    "model.policy": ("openai-community/gpt2", "google/gemma-2b", "seeds/000 Sec. 4: GPT-2; Gemma at 2B"),
    "sft.lr": (1e-5, 5e-6, "seeds/000 App. E.6: learning rate 1e-5 (Harmless), 5e-6 (Helpful)"),
    "reward.lr": (1e-5, 5e-6, "seeds/000 App. E.6: learning rate 1e-5 (Harmless), 5e-6 (Helpful)"),
    "rollout.max_new_tokens": (48, 128, "seeds/000 App. E.3: 48 tokens (Harmless), 128 (Helpful)"),
    "run.golden_reward": ("Ray2333/gpt2-large-harmless-reward_model", "weqweasdas/RM-Gemma-2B", "seeds/000 App. E.3"),
}
STATED = (  # (preset, key, value, where the seed states it)
    [(p, k, v, w) for p in ("hh-harmless", "hh-helpful") for k, v, w in BOTH_HH]
    + [(p, k, v[i], v[2]) for k, v in PER_TASK.items() for i, p in enumerate(("hh-harmless", "hh-helpful"))]
    + [("ultrachat-8gpu", "model.policy", "HuggingFaceH4/mistral-7b-sft-beta", "seeds/004 Sec. VI-C-1: Mistral-7b-SFT-Beta"),
       ("ultrachat-8gpu", "data.demonstrations", "HuggingFaceH4/ultrachat_200k", "seeds/004 Sec. VI-C-1: UltraChat"),
       ("ultrachat-8gpu", "policy.algo", "online_dpo", "seeds/002: Online-DPO for UltraChat"),
       ("tldr-ppo", "data.demonstrations", "CarperAI/openai_summarize_tldr", "seeds/002: TL;DR"),
       ("tldr-ppo", "policy.algo", "ppo", "seeds/002: PPO"),
       ("tldr-ppo", "model.sft", "", "seeds/002: policy and reward model from the SFT checkpoint (trained first)")])


@pytest.mark.parametrize("preset,key,value,where", STATED, ids=[f"{p}:{k}" for p, k, _, _ in STATED])
def test_a_paper_preset_holds_the_setting_its_seed_states(preset, key, value, where):
    cfg = load_config(preset)
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    if key == "bon.n":
        got = max(got)
    assert got == value, f"{preset} {key}: {got!r}, {where} says {value!r}"


@pytest.mark.parametrize("preset,fmt", [("hh-harmless", "hh"), ("hh-helpful", "chat")])
def test_each_golden_reward_model_is_read_in_the_format_it_was_trained_on(preset, fmt):
    assert load_config(preset).run.golden_format == fmt


@pytest.mark.parametrize("preset", ["tldr-ppo", "ultrachat-2gpu", "ultrachat-8gpu"])
def test_a_gpu_preset_takes_several_policy_steps_of_a_reasonable_size_per_iteration(preset):
    """Sequences per optimizer step (prompts x samples / mini-batches) of the size the seeds' and peers'
    setups use, not one step per iteration over a thousand prompts."""
    r, p = load_config(preset).rollout, load_config(preset).policy
    per_step = r.prompts_per_iteration * r.n / p.mini_batches
    assert p.mini_batches * p.epochs >= 4 and 32 <= per_step <= 256, (preset, p.mini_batches, per_step)
