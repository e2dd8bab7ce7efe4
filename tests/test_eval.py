"""Evaluation helpers: golden rewards (Python function or HF classifier), standard errors, win rates,
reward accuracy per subset."""

import json

import pytest
import torch

from afd_ray.eval.accuracy import accuracy, load_preference_pairs, reward_accuracy
from afd_ray.eval.golden import load_golden, mean_se, win_rate


def test_mean_se_and_win_rate_by_hand():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / 3 ** 0.5)
    w, wse = win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1])  # win, tie, lose, win: 1, 1/2, 0, 1
    assert w == pytest.approx(2.5 / 4)
    # squared deviations from 5/8: 9/64, 1/64, 25/64, 9/64 -> sample variance 44/64/3, se = sqrt(var / 4)
    assert wse == pytest.approx((44 / 64 / 3 / 4) ** 0.5)
    with pytest.raises(ValueError, match="3 candidate vs 2 baseline"):
        win_rate([1, 2, 3], [1, 2])


def test_golden_from_a_python_function(tokenizer):
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 8, seed=1)
    g = load_golden("afd_ray.toy:golden_reward", tokenizer)
    scores = g([d.prompt_ids for d in demos], [d.response_ids for d in demos])
    assert scores == toy.golden_reward([d.prompt_ids for d in demos], [d.response_ids for d in demos], tokenizer)
    with pytest.raises(ValueError, match="cannot import nope"):
        load_golden("afd_ray.toy:nope", tokenizer)


def test_golden_from_an_hf_sequence_classifier(tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from afd_ray.models.loading import load_reward_model, save_model

    path = save_model(load_reward_model(str(tiny_llama_dir), seed=3), tokenizer, tmp_path / "golden_rm")
    g = load_golden(str(path), tokenizer, batch_size=2)  # a padded batch and a batch of one
    texts = ("Hello!", "Go away.", "Hello!")
    s = g([tokenizer("Hi")["input_ids"]] * 3, [tokenizer(t)["input_ids"] for t in texts])
    # independently: the classifier's logit 0 on each decoded (prompt, response) text pair, one at a time
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = [model(**tokenizer("Hi", t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert s == pytest.approx(want, abs=1e-5) and abs(want[0] - want[1]) > 1e-4


def test_reward_accuracy_per_subset():
    out = accuracy([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, -1.0, 1.0], ["a", "a", "b", "b"])
    assert out["accuracy"] == 0.75 and out["subset/a"] == 0.5 and out["subset/b"] == 1.0


def test_rewardbench_style_file(tokenizer, tmp_path):
    f = tmp_path / "rb.jsonl"
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "subset": "math"},
            {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "subset": "facts"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, subsets = load_preference_pairs(str(f), tokenizer)
    assert subsets == ["math", "facts"] and tokenizer.decode(pairs[1].chosen_ids) == "Paris<|im_end|>"

    def longer_is_better(prompts, responses):  # a stand-in scorer with a known answer
        return [float(len(r)) for r in responses]

    acc = reward_accuracy(longer_is_better, pairs, subsets)
    assert acc["pairs"] == 2 and acc["subset/facts"] == float(len(pairs[1].chosen_ids) > len(pairs[1].rejected_ids))


def test_toy_preference_subsets(tokenizer):
    from afd_ray import toy

    pairs, subsets = load_preference_pairs("toy", tokenizer, limit=40)
    assert subsets.count("toy-length") == 20 and subsets.count("toy-parity") == 20
    g = lambda ps: toy.golden_reward([p.prompt_ids for p in ps], [p.chosen_ids for p in ps], tokenizer)  # noqa: E731
    worse = toy.golden_reward([p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs], tokenizer)
    assert all(a > b for a, b in zip(g(pairs), worse))  # ranked by the golden reward
    assert all(len(p.chosen_ids) == len(p.rejected_ids) == 9 for p, s in zip(pairs, subsets) if s == "toy-parity")


def test_fixed_length_toy_has_no_end_token_and_the_same_golden_reward(tokenizer):
    from afd_ray import toy

    fixed, ended = toy.make_demonstrations(tokenizer, 16, seed=3, eos=False), toy.make_demonstrations(tokenizer, 16, seed=3)
    assert all(len(d.response_ids) == toy.LENGTH and tokenizer.eos_token_id not in d.response_ids for d in fixed)
    assert [d.response_ids for d in fixed] == [d.response_ids[:-1] for d in ended]  # same digits, no EOS
    gold = lambda ds: toy.golden_reward([d.prompt_ids for d in ds], [d.response_ids for d in ds], tokenizer)  # noqa: E731
    assert gold(fixed) == gold(ended)
    pairs, subsets = load_preference_pairs("toy-fixed", tokenizer, limit=24)
    assert subsets == ["toy-parity"] * 24
    assert all(len(p.chosen_ids) == len(p.rejected_ids) == toy.LENGTH for p in pairs)
    better = toy.golden_reward([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], tokenizer)
    worse = toy.golden_reward([p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs], tokenizer)
    assert all(a > b for a, b in zip(better, worse))


@pytest.mark.slow
def test_vllm_and_hf_generation_agree_greedily(ray_local, toy_sft, tokenizer, tmp_path):
    """The evaluation's vLLM path (a short-lived rollout engine) and HF generate give the same greedy
    responses, so `--engine vllm` changes the speed of an evaluation, not its answers."""
    from afd_ray import toy
    from afd_ray.eval.evaluate import evaluate, generate, generate_vllm

    prompts = [d.prompt_ids for d in toy.make_demonstrations(tokenizer, 24, seed=5)]
    fast = generate_vllm(str(toy_sft), prompts, tokenizer, max_new_tokens=10, temperature=0.0)
    slow = generate(str(toy_sft), prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 10, temperature=0.0)
    assert fast == slow
    assert sum(map(len, fast)) > 24 * 4
    with pytest.raises(ValueError, match="engine must be 'hf' or 'vllm'"):
        evaluate([], toy.make_demonstrations(tokenizer, 2, seed=5), tokenizer, tmp_path, engine="trt")


def test_toy_sft_command_builds_a_policy_the_preset_takes(tmp_path, capsys):
    from afd_ray import toy
    from afd_ray.config import load_config
    from afd_ray.models.loading import load_policy

    assert toy.main([str(tmp_path / "toy"), "--fixed", "--steps", "2", "--demonstrations", "64"]) == 0
    out = capsys.readouterr().out
    assert f"--config toy-fixed model.policy={tmp_path / 'toy' / 'sft'}" in out
    assert load_policy(str(tmp_path / "toy" / "sft")).config.num_hidden_layers == 2
    assert load_config("toy-fixed", [f"model.policy={tmp_path / 'toy' / 'sft'}"]).data.demonstrations == "toy-fixed"
