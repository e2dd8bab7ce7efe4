"""Rule rewards (afd_ray.rewards): user functions with weights, the missing-EOS and overlong penalties, their
metrics, errors that name the setting; the policy step adds them to the reward model's score or uses them alone."""

import pytest
import torch

from afd_ray.config import ConfigError, load_config
from afd_ray.rewards import RuleRewards, import_function, overlong_reward

EOS = 2


class Tok:
    eos_token_id = EOS

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(t) for t in r if not (skip_special_tokens and t == EOS)) for r in rows]


def count_sevens(prompts, responses, tokenizer):
    """Token ids on purpose: how many 7s in the response."""
    return [float(sum(t == 7 for t in r)) for r in responses]


def text_length(prompts, responses, tokenizer, *, prompt_texts, response_texts):
    return [float(len(t)) for t in response_texts]


def wrong_length(prompts, responses, tokenizer):
    return [0.0]


def not_finite(prompts, responses, tokenizer):
    return [float("nan")] * len(responses)


def cfg_of(*overrides):
    return load_config("toy", ["model.policy=x", "rollout.max_new_tokens=8", *overrides])


def test_functions_are_weighted_summed_and_logged_per_function():
    rules = RuleRewards.from_config(cfg_of(f"reward.functions=[{__name__}:count_sevens,{__name__}:text_length]",
                                           "reward.function_weights=[2.0,-0.5]"), Tok())
    prompts, responses = [[1], [1]], [[7, 7, EOS], [7, 10, 11]]
    total, m = rules(prompts, responses)
    # text lengths: "7 7" (EOS skipped) = 3 characters, "7 10 11" = 7
    assert total.tolist() == pytest.approx([2 * 2 - 0.5 * 3, 2 * 1 - 0.5 * 7])
    assert m == {"rules/count_sevens": 1.5, "rules/text_length": 5.0}


def test_missing_eos_penalty_hits_only_responses_cut_before_their_end():
    rules = RuleRewards.from_config(cfg_of("reward.missing_eos_penalty=1.5"), Tok())
    total, m = rules([[1]] * 3, [[5, EOS], [5] * 8, []])
    assert total.tolist() == [0.0, -1.5, -1.5] and m == {"rules/missing_eos": pytest.approx(2 / 3)}


def test_overlong_punishment_is_dapos_soft_ramp():
    # L_max 8, L_cache 4: free up to 4 tokens, then -1/4 per token down to -1 at 8
    assert overlong_reward(torch.tensor([0.0, 4.0, 5.0, 6.0, 8.0, 9.0]), 8, 4).tolist() == [0, 0, -0.25, -0.5, -1, -1]
    rules = RuleRewards.from_config(cfg_of("reward.overlong_buffer=4", "reward.overlong_penalty_factor=2"), Tok())
    total, m = rules([[1]] * 2, [[5] * 3, [5] * 6])
    assert total.tolist() == [0.0, -1.0] and m == {"rules/overlong": -0.25}


def test_no_rule_configured_means_none():
    assert RuleRewards.from_config(cfg_of(), Tok()) is None


@pytest.mark.parametrize("spec, match", [
    ("nocolon", r"reward.functions\[0\]: 'nocolon' is not module:function"),
    ("afd_ray.nowhere:f", r"reward.functions\[0\]: cannot import f from afd_ray.nowhere"),
    (f"{__name__}:missing", r"reward.functions\[0\]: cannot import missing"),
])
def test_a_bad_function_entry_names_the_setting(spec, match):
    with pytest.raises(ValueError, match=match):
        RuleRewards.from_config(cfg_of(f"reward.functions=[{spec}]"), Tok())
    with pytest.raises(ValueError, match="run.golden_reward: cannot import"):
        import_function("afd_ray.nowhere:f", "run.golden_reward")


@pytest.mark.parametrize("fn, match", [("wrong_length", "returned 1 values for 2 responses"),
                                       ("not_finite", "returned nan for response 0")])
def test_a_function_that_returns_bad_values_is_named(fn, match):
    rules = RuleRewards.from_config(cfg_of(f"reward.functions=[{__name__}:{fn}]"), Tok())
    with pytest.raises(ValueError, match=f"rule reward {__name__}:{fn} {match}"):
        rules([[1], [1]], [[5], [6]])


@pytest.mark.parametrize("overrides, match", [
    (["reward.functions=[a:b]", "reward.function_weights=[1.0,2.0]"], "has 2 weights for 1 reward.functions"),
    (["reward.overlong_buffer=9"], "must be at most rollout.max_new_tokens"),
    (["run.method=rlhf"], "run.method=rlhf trains on a fixed reward: set model.reward"),
    (["run.method=rlhf", "model.reward=rm", "reward.url=http://127.0.0.1:8001"], "not both"),
    (["reward.url=http://127.0.0.1:8001"], "reward.url .* is for run.method=rlhf, got run.method=irl"),
])
def test_config_refuses_inconsistent_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(*overrides)


def test_rlhf_on_rules_alone_trains_on_them_without_a_reward_model():
    """No reward actor: the policy step's rewards are the rules' alone, the held-out diagnostics keep the
    golden reward and drop the reward-model ones."""
    from test_driver import demos, fakes

    from afd_ray.driver import LoopState, irl_iteration
    from afd_ray.replay import DataCursor

    cfg = load_config("toy", ["model.policy=x", "run.method=rlhf", "rollout.prompts_per_iteration=2",
                              "rollout.n=2", "policy.algo=reinforce", "policy.kl=loss",
                              f"reward.functions=[{__name__}:count_sevens]"])
    d, c = demos(), fakes()
    c.reward, c.rules = None, RuleRewards.from_config(cfg, Tok())
    d[0].prompt_ids[0] = 7  # FakeRollout answers [p[0], j]: prompt 0's samples hold one 7
    state = LoopState(cursor=DataCursor(len(d), seed=0))
    m = irl_iteration(1, cfg, d, d[:2], c, state, learn_reward=False)
    assert "reward/loss" not in m and "heldout/reward_accuracy" not in m and "golden/heldout_policy" in m
    assert "reward/model_score" not in m and "rules/count_sevens" in m
    seqs = c.policy.batches[0].seqs
    expected = [float(r.count(7)) for r in seqs.responses]
    assert m["rules/count_sevens"] == pytest.approx(sum(expected) / len(expected))


@pytest.mark.slow
def test_toy_grpo_on_a_rule_reward_alone_raises_that_rule(ray_local, toy_sft, tmp_path):
    """run.method=rlhf with the toy's golden reward as the only reward: no reward actor, and GRPO raises it."""
    from afd_ray.run import run

    rd = run(load_config("toy", [f"model.policy={toy_sft}", f"run.output_dir={tmp_path}", "run.name=rules",
                                 "run.method=rlhf", "policy.algo=grpo", "run.iterations=8",
                                 "reward.functions=[afd_ray.toy:golden_reward]"]), echo=lambda *_: None)
    ms = rd.metrics()
    first, last = ms[0]["rules/golden_reward"], sum(m["rules/golden_reward"] for m in ms[-2:]) / 2
    assert last > first + 0.08, f"rule reward of the samples {first:.3f} -> {last:.3f}"
    assert "reward/model_score" not in ms[0] and not (rd.ckpt / "iter_000008" / "reward").exists()
    assert (rd.ckpt / "iter_000008" / "policy" / "README.md").exists()


@pytest.mark.slow
def test_toy_rlhf_on_a_frozen_reward_model_raises_its_score(ray_local, toy_sft, tokenizer, tmp_path):
    """seeds/004 Protocol 3: a Bradley-Terry reward model trained elsewhere (on golden-ranked toy pairs, 0.98
    accuracy) is only scored: rlhf raises its score and with it the golden reward; nothing of it is trained
    or checkpointed."""
    from afd_ray import toy
    from afd_ray.run import run

    rm = toy.reward_model_from_preferences(tmp_path / "rm", toy_sft, tokenizer,
                                           toy.make_preferences(tokenizer, 1024, seed=5), steps=120)
    rd = run(load_config("toy", [f"model.policy={toy_sft}", f"model.reward={rm}", f"run.output_dir={tmp_path}",
                                 "run.name=frozen", "run.method=rlhf", "policy.algo=grpo", "run.iterations=8"]),
             echo=lambda *_: None)
    ms = rd.metrics()
    first, last = ms[0]["reward/model_score"], sum(m["reward/model_score"] for m in ms[-2:]) / 2
    golden_first, golden_last = ms[0]["golden/heldout_policy"], sum(m["golden/heldout_policy"] for m in ms[-2:]) / 2
    assert last > first + 0.5, f"frozen reward model's score of the samples {first:.3f} -> {last:.3f}"
    assert golden_last > golden_first + 0.05, f"golden reward {golden_first:.3f} -> {golden_last:.3f}"
    assert "reward/loss" not in ms[-1] and not (rd.ckpt / "iter_000008" / "reward").exists()


def test_a_served_reward_model_is_retried_like_the_judge_and_a_dead_batch_scores_nan(pooling_server, caplog):
    from afd_ray.rewards import ServedRewardModel
    from afd_ray.types import SequenceBatch

    url = f"http://127.0.0.1:{pooling_server.server_address[1]}"
    seqs = SequenceBatch([[1, 2]] * 3, [[3], [3, 4], [3, 4, 5]])
    pooling_server.script = lambda n: 500 if n <= 2 else 200  # HTTP 500 twice, then an answer
    rm = ServedRewardModel(url, "rm", batch_size=2, max_concurrency=1, backoff=0.01)
    assert rm.score(seqs).tolist() == [3.0, 4.0, 5.0] and rm.retries == 2 and rm.failed == 0
    assert "HTTP" in caplog.text or "500" in caplog.text
    pooling_server.script = lambda n: 503  # down for good: NaN, which the loop's guard skips and counts
    rm = ServedRewardModel(url, "rm", batch_size=2, max_concurrency=1, max_retries=2, backoff=0.01)
    scores = rm.score(seqs)
    assert torch.isnan(scores).all() and rm.failed == 2 and rm.requests == 6
    pooling_server.script = lambda n: 404  # a wrong model name: no retry can help
    with pytest.raises(ValueError, match="HTTP 404 for model 'rm'"):
        ServedRewardModel(url, "rm", backoff=0.01).score(seqs)


@pytest.mark.slow
def test_a_served_reward_model_scores_as_the_model_in_process(toy_sft, tokenizer, tmp_path):
    """A real `vllm serve --runner pooling` of a reward model: the same rewards as loading it here."""
    from afd_ray import toy
    from afd_ray.data.tokenize import collate
    from afd_ray.eval.serve import OpenAIServer
    from afd_ray.models.loading import load_reward_model, reward_forward
    from afd_ray.rewards import ServedRewardModel
    from afd_ray.types import SequenceBatch

    rm = toy.reward_model_from_preferences(tmp_path / "rm", toy_sft, tokenizer,
                                           toy.make_preferences(tokenizer, 256, seed=5), steps=20)
    prefs = toy.make_preferences(tokenizer, 24, seed=9)
    seqs = SequenceBatch([p.prompt_ids for p in prefs] * 2, [p.chosen_ids for p in prefs] + [p.rejected_ids for p in prefs])
    b = collate(seqs.prompts, seqs.responses, tokenizer.pad_token_id)
    with torch.no_grad():
        here = reward_forward(load_reward_model(str(rm)).eval(), b.input_ids, b.attention_mask)
    with OpenAIServer(str(rm), served_name="rm", max_model_len=64, extra_args=["--runner", "pooling"]) as srv:
        served = ServedRewardModel(srv.base_url, batch_size=16).score(seqs)  # the model name from /v1/models
    assert served.shape == here.shape and here.std() > 0.1
    assert torch.allclose(served, here, atol=1e-3), (served - here).abs().max()
