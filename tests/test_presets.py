"""The paper presets hold the settings their seeds state: each row names the seed and the section it comes from
(values a seed leaves open are named as our choice in the preset's comments, and not checked here)."""

import pytest

from afd_ray.config import load_config

STATED = [  # (preset, key, value, where the seed states it)
    ("hh-harmless", "model.policy", "openai-community/gpt2", "seeds/000 Sec. 4: GPT-2 (Harmless)"),
    ("hh-harmless", "model.lora_r", 32, "seeds/000 App. E.6: LoRA-R 32"),
    ("hh-harmless", "model.lora_alpha", 32, "seeds/000 App. E.6: LoRA-alpha 32"),
    ("hh-harmless", "sft.lr", 1e-5, "seeds/000 App. E.6: learning rate 1e-5 (Harmless)"),
    ("hh-harmless", "reward.lr", 1e-5, "seeds/000 App. E.6: learning rate 1e-5 (Harmless)"),
    ("hh-harmless", "sft.micro_batch_size", 4, "seeds/000 App. E.6: mini-batch size 4"),
    ("hh-harmless", "sft.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("hh-harmless", "reward.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("hh-harmless", "sft.epochs", 2, "seeds/000 App. E.6: 2 epochs for SFT"),
    ("hh-harmless", "bon.rm_epochs", 2, "seeds/000 App. E.6: 2 epochs for reward models"),
    ("hh-harmless", "rollout.max_new_tokens", 48, "seeds/000 App. E.3: 48 tokens (Harmless)"),
    ("hh-harmless", "run.golden_reward", "Ray2333/gpt2-large-harmless-reward_model", "seeds/000 App. E.3"),
    ("hh-harmless", "bon.data_choice", "init_sft", "seeds/000 Table 1: Init-SFT RM"),
    ("hh-harmless", "bon.n", 1000, "seeds/000 App. E.5: N = 1000 (the largest N)"),
    ("hh-helpful", "model.policy", "google/gemma-2b", "seeds/000 Sec. 4: Gemma, 2B (Helpful)"),
    ("hh-helpful", "model.lora_r", 32, "seeds/000 App. E.6: LoRA-R 32"),
    ("hh-helpful", "model.lora_alpha", 32, "seeds/000 App. E.6: LoRA-alpha 32"),
    ("hh-helpful", "sft.lr", 5e-6, "seeds/000 App. E.6: learning rate 5e-6 (Helpful)"),
    ("hh-helpful", "reward.lr", 5e-6, "seeds/000 App. E.6: learning rate 5e-6 (Helpful)"),
    ("hh-helpful", "sft.micro_batch_size", 4, "seeds/000 App. E.6: mini-batch size 4"),
    ("hh-helpful", "sft.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("hh-helpful", "reward.batch_size", 8, "seeds/000 App. E.6: mini-batch 4, gradient accumulation 2"),
    ("hh-helpful", "sft.epochs", 2, "seeds/000 App. E.6: 2 epochs for SFT"),
    ("hh-helpful", "bon.rm_epochs", 2, "seeds/000 App. E.6: 2 epochs for reward models"),
    ("hh-helpful", "rollout.max_new_tokens", 128, "seeds/000 App. E.3: 128 tokens (Helpful)"),
    ("hh-helpful", "run.golden_reward", "weqweasdas/RM-Gemma-2B", "seeds/000 App. E.3"),
    ("hh-helpful", "bon.data_choice", "init_sft", "seeds/000 Table 1: Init-SFT RM"),
    ("hh-helpful", "bon.n", 1000, "seeds/000 App. E.5: N = 1000 (the largest N)"),
    ("ultrachat-8gpu", "model.policy", "HuggingFaceH4/mistral-7b-sft-beta", "seeds/004 Sec. VI-C-1: Mistral-7b-SFT-Beta"),
    ("ultrachat-8gpu", "data.demonstrations", "HuggingFaceH4/ultrachat_200k", "seeds/004 Sec. VI-C-1: UltraChat"),
]


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
