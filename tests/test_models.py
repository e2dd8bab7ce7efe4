"""Models: the offline default loads and generates offline; tiny Llama; reward model pooling, save, LoRA."""

import os
import subprocess
import sys

import pytest
import torch

from afd_ray.data.tokenize import collate, left_pad
from afd_ray.models.loading import (
    LoraSpec,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    reward_forward,
    save_model,
)
from afd_ray.models.tiny import build_tiny_llama


def test_offline_default_loads_and_generates_without_network(smollm2_dir):
    code = (
        "from afd_ray.models.loading import load_policy, load_tokenizer\n"
        "tok = load_tokenizer('smollm2-offline'); m = load_policy('smollm2-offline')\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],"
        " tokenize=False, add_generation_prompt=True)\n"
        "ids = tok(text, return_tensors='pt', add_special_tokens=False).input_ids\n"
        "out = m.generate(ids, max_new_tokens=12, do_sample=False)\n"
        "print(tok.decode(out[0, ids.shape[1]:]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout


def test_tiny_llama_is_deterministic_and_checks_head_dim(tmp_path, smollm2_dir, tiny_llama_dir):
    again = build_tiny_llama(tmp_path / "again", smollm2_dir, seed=0)
    a, b = load_policy(str(tiny_llama_dir)), load_policy(str(again))
    assert a.config.head_dim == 64 // 2 and a.config.vocab_size == 49152  # hidden 64, 2 heads
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_llama(tmp_path / "bad", smollm2_dir, hidden_size=64, num_heads=4)


def test_reference_is_frozen(tiny_llama_dir):
    ref = load_reference(str(tiny_llama_dir))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_reward_model_pools_last_real_token_any_padding(tiny_llama_dir, tokenizer):
    rm = load_reward_model(str(tiny_llama_dir), seed=3).eval()
    prompts, responses = [[1, 5, 9, 11], [1, 7]], [[20, 21, 2], [30, 2]]
    right = collate(prompts, responses, tokenizer.pad_token_id)
    left_ids, left_mask = left_pad([p + r for p, r in zip(prompts, responses)], tokenizer.pad_token_id)
    with torch.no_grad():
        r_right = reward_forward(rm, right.input_ids, right.attention_mask)
        r_left = reward_forward(rm, left_ids, left_mask)
        r_alone = reward_forward(rm, torch.tensor([[1, 7, 30, 2]]), torch.ones(1, 4, dtype=torch.long))
    assert r_right.shape == (2,) and torch.allclose(r_right, r_left, atol=1e-4)
    assert torch.allclose(r_right[1], r_alone[0], atol=1e-4)
    again = load_reward_model(str(tiny_llama_dir), seed=3)
    assert torch.equal(again.score.weight, rm.score.weight)  # seeded head


def test_reward_model_saves_in_hf_format(tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = load_reward_model(str(tiny_llama_dir), seed=1).eval()
    out = save_model(rm, tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()  # any HF user can load it
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(reward_forward(rm, ids, torch.ones_like(ids)),
                              reward_forward(loaded, ids, torch.ones_like(ids)), atol=1e-5)
    assert torch.allclose(reward_forward(load_reward_model(str(out)), ids, torch.ones_like(ids)),
                          reward_forward(rm, ids, torch.ones_like(ids)), atol=1e-5)


def test_lora_trains_adapters_and_saves_merged(tiny_llama_dir, tokenizer, tmp_path):
    model = load_policy(str(tiny_llama_dir), lora=LoraSpec(r=4, alpha=8))
    def trainable():
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # only the adapters train: A (r x 64) and B (64 x r) on q, k, v, o of both layers (hidden 64, r = 4)
    assert trainable() == 2 * 4 * (4 * 64 + 64 * 4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # make the adapter matter
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model(ids).logits
    out = save_model(model, tokenizer, tmp_path / "merged")
    with torch.no_grad():  # the training copy keeps its adapters, unmerged: same count, same outputs
        assert trainable() == 2 * 4 * (4 * 64 + 64 * 4) and torch.allclose(model(ids).logits, expected, atol=1e-5)
    merged = load_policy(str(out))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    assert load_tokenizer(str(out)).pad_token_id is not None


def test_a_base_model_without_a_chat_template_gets_the_plain_dialogue_format(smollm2_dir, tmp_path):
    import json
    import shutil

    from afd_ray.data.schema import Demonstration
    from afd_ray.data.tokenize import TruncationRules, encode_demonstration
    from afd_ray.models.loading import load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(smollm2_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(str(base))
    enc = encode_demonstration(tok, Demonstration([{"role": "user", "content": "Hi there"}], "Hello!"),
                               TruncationRules())
    assert tok.decode(enc.prompt_ids) == "\n\nHuman: Hi there\n\nAssistant:"
    assert enc.response_ids[-1] == tok.eos_token_id and tok.decode(enc.response_ids[:-1]) == " Hello!"
