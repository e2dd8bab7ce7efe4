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

    # only the adapters train: A (r x in) and B (out x r) on q, k, v, o (64 -> 64) and gate, up (64 -> 128),
    # down (128 -> 64) of both layers (hidden 64, intermediate 128, r = 4)
    adapters = 2 * 4 * (4 * (64 + 64) + 3 * (64 + 128))
    assert trainable() == adapters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # make the adapter matter
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model(ids).logits
    out = save_model(model, tokenizer, tmp_path / "merged")
    with torch.no_grad():  # the training copy keeps its adapters, unmerged: same count, same outputs
        assert trainable() == adapters and torch.allclose(model(ids).logits, expected, atol=1e-5)
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


def _tiny(arch: str, head: str = "lm"):
    """A random two-block model of ``arch`` (hidden 64, MLP 128, vocab 128), built in memory."""
    import transformers

    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_inner=128,
                                         n_positions=64, bos_token_id=1, eos_token_id=2)
    elif arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                            bos_token_id=1, eos_token_id=2)
    else:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, max_position_embeddings=64)
    config.num_labels, config.pad_token_id = 1, 0
    cls = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    return cls.from_config(config).eval()  # GPT-2 has dropout


@pytest.mark.parametrize("arch, attention, mlp, per_block", [
    ("gpt2", {"c_attn", "c_proj"}, {"c_fc", "c_proj"}, 4),  # c_proj: attention output and MLP output
    ("gpt_neox", {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}, 4),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}, 7),
])
@pytest.mark.parametrize("head", ["lm", "score"])
def test_lora_targets_every_block_linear_of_any_architecture(arch, attention, mlp, per_block, head):
    from afd_ray.models.loading import apply_lora, lora_targets, reward_head, transformer_blocks

    model = _tiny(arch, head)
    assert set(lora_targets(model)) == attention | mlp
    ids = torch.tensor([[3, 5, 9, 2]])
    with torch.no_grad():
        before = model(ids).logits
    wrapped = apply_lora(model, LoraSpec(r=4, alpha=8), task_type="CAUSAL_LM" if head == "lm" else "SEQ_CLS")
    adapted = {name.split(".lora_A.")[0] for name, _ in wrapped.named_parameters() if ".lora_A." in name}
    assert {name.split(".")[-1] for name in adapted} == attention | mlp
    assert len(adapted) == 2 * per_block  # every linear of both blocks
    assert len(transformer_blocks(wrapped)) == 2
    assert not any("lora_" in n for n, _ in wrapped.named_parameters() if "wte" in n or "embed" in n or "lm_head" in n)
    if head == "score":
        from afd_ray.models.loading import reward_forward

        assert reward_head(wrapped).weight.requires_grad  # the new head trains in full
        assert reward_forward(wrapped, ids, torch.ones_like(ids)).shape == (1,)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
        adapted_logits = wrapped(ids).logits
        merged_logits = __import__("copy").deepcopy(wrapped).merge_and_unload()(ids).logits
    assert adapted_logits.shape == before.shape and not torch.allclose(adapted_logits, before)
    # GPT-2's Conv1D keeps its weight transposed: the merged model must still compute the adapted one
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5)


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)])
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(tiny_llama_dir, lora):
    from afd_ray.models.loading import enable_gradient_checkpointing, transformer_blocks

    ids = torch.tensor([[1, 5, 9, 11, 20, 21, 2], [1, 7, 30, 2, 0, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    grads, runs = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        model = load_policy(str(tiny_llama_dir), lora=lora).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert not model.config.use_cache
        runs[checkpointing] = []
        transformer_blocks(model)[0].register_forward_pre_hook(lambda *_, r=runs[checkpointing]: r.append(1))
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(runs[True]) == 2 and len(runs[False]) == 1  # the block ran again in the backward pass
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-6), name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)])
def test_response_logprobs_split_off_the_output_layer_match_the_full_logits(arch, lora):
    """The output layer on the response positions only gives the full logits' log-probs and gradients."""
    from afd_ray.algo.masked import token_logprobs
    from afd_ray.models.loading import apply_lora, output_layer_splits, response_logprobs

    ids = torch.tensor([[1, 5, 9, 11, 20, 21, 2], [1, 7, 30, 2, 0, 0, 0]])
    attn = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])  # responses on the next-token grid
    grads, logps = [], []
    for split in (True, False):
        model = _tiny(arch, "lm")
        if lora:
            torch.manual_seed(1)
            model = apply_lora(model, lora)
        assert output_layer_splits(model.get_base_model() if lora else model)
        if split:
            logp = response_logprobs(model, ids, attn, mask)
        else:
            logp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:]) * mask
        (logp * mask).sum().backward()
        logps.append(logp)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert (logps[0][mask == 0] == 0).all() and (logps[0][mask == 1] < 0).all()
    assert torch.allclose(logps[0], logps[1], atol=1e-5)
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, atol=1e-5), name


def test_response_logprobs_keep_the_full_logits_where_they_are_not_the_output_layer():
    """Gemma-2 soft-caps its logits after the output layer: the split is refused and the values stay right."""
    import transformers

    from afd_ray.algo.masked import token_logprobs
    from afd_ray.models.loading import output_layer_splits, response_logprobs

    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=32, intermediate_size=128,
                                       max_position_embeddings=64, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert not output_layer_splits(model)
    ids, mask = torch.tensor([[1, 5, 9, 11]]), torch.tensor([[0, 1, 1]])
    full = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:]) * mask
    assert torch.allclose(response_logprobs(model, ids, torch.ones_like(ids), mask), full)
