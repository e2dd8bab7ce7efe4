"""(x, y) re-rendered for a model with another tokenizer or template (afd_ray.data.render): a fixed reward model
of run.method=rlhf (in a reward actor or served) and a golden reward model read each sample in their own chat
template, in HH text, or as a text pair, from the policy's token ids; a cut response stays cut."""

import pytest
import torch

from afd_ray.config import load_config
from afd_ray.data.render import Rerender, hh_text, prompt_messages, resolve_format
from afd_ray.data.schema import Demonstration
from afd_ray.data.tokenize import TruncationRules, encode_demonstrations
from afd_ray.types import SequenceBatch

TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
CORPUS = ["The cat sat on the mat. What is two plus two? Four. Tell me a story about a dog.",
          "user assistant system Human Assistant Summarise the post: I lost my keys again today."] * 20
QUESTIONS = [("What is two plus two?", "Four, since 2 + 2 = 4."),
             ("Tell me a story about a dog.", "A dog found a ball <|im_end|> and kept it."),
             ("Summarise the post: I lost my keys again today.", "Keys lost, again.")]


def other_tokenizer(path, template: str | None = TEMPLATE):
    """A byte-level BPE tokenizer with its own vocabulary (400 tokens), end-of-turn and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eot|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eot|>", pad_token="<|pad|>")
    fast.chat_template = template
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def other_reward_model(path, tokenizer_path):
    """A tiny random LlamaForSequenceClassification reading ``tokenizer_path``'s vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def encoded(tokenizer):
    demos = [Demonstration([{"role": "user", "content": q}], a, "t", i) for i, (q, a) in enumerate(QUESTIONS)]
    return encode_demonstrations(tokenizer, demos, TruncationRules(on_special_tokens="escape"))[0]


def test_chat_rerender_is_the_targets_template_and_a_cut_response_stays_cut(tokenizer, encoded, tmp_path):
    target = other_tokenizer(tmp_path / "tok")
    rr = Rerender(tokenizer, target, "chat", prompt_messages(encoded))
    for e, (q, a) in zip(encoded, QUESTIONS):
        p, r = rr.one(e.prompt_ids, e.response_ids)
        assert target.decode(p) == f"<|bos|>user\n{q}<|eot|><|bos|>assistant\n"
        assert target.decode(r) == a + "<|eot|>" and r[-1] == target.eos_token_id
        # the special-token text of the demonstration stays text in the target's ids too
        assert (target.convert_tokens_to_ids("<|eot|>") not in r[:-1])
        cut_p, cut_r = rr.one(e.prompt_ids, e.response_ids[:-3])  # cut at max_new_tokens: no end of turn
        assert cut_p == p and target.eos_token_id not in cut_r
    batch = rr.batch(SequenceBatch([e.prompt_ids for e in encoded], [e.response_ids for e in encoded]))
    assert len(batch) == 3 and batch.prompts[0] == rr.one(encoded[0].prompt_ids, encoded[0].response_ids)[0]
    with pytest.raises(ValueError, match="not in the run's data"):
        rr.one(encoded[0].prompt_ids[:-1], encoded[0].response_ids)


def test_hh_and_pair_forms_and_when_a_rerender_is_needed(tokenizer, encoded, tmp_path):
    plain = other_tokenizer(tmp_path / "plain", template=None)
    hh = Rerender(tokenizer, plain, "hh", prompt_messages(encoded))
    p, r = hh.one(encoded[0].prompt_ids, encoded[0].response_ids)
    assert plain.decode(p + r) == "\n\nHuman: What is two plus two?\n\nAssistant: Four, since 2 + 2 = 4."
    assert hh_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]) == \
        "Be brief.\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    pair = Rerender(tokenizer, plain, "pair", prompt_messages(encoded))
    assert pair.texts([encoded[2].prompt_ids], [encoded[2].response_ids]) == ([QUESTIONS[2][0]], [QUESTIONS[2][1]])
    assert resolve_format("auto", tokenizer, tokenizer, "reward.input_format") is None  # the same: ids as they are
    assert resolve_format("auto", tokenizer, other_tokenizer(tmp_path / "chat"), "reward.input_format") == "chat"
    with pytest.raises(ValueError, match="reward.input_format=auto.*no chat template"):
        resolve_format("auto", tokenizer, plain, "reward.input_format")
    with pytest.raises(ValueError, match="run.golden_format=chat: .*no chat template"):
        resolve_format("chat", tokenizer, plain, "run.golden_format")


def test_a_served_reward_model_with_its_own_tokenizer_reads_the_rerendered_ids(tokenizer, encoded, tmp_path,
                                                                                 pooling_server):
    """reward.url + reward.tokenizer: the served model gets its own token ids (the scripted server scores a
    sequence by its length, so the scores are the lengths of the re-rendered sequences)."""
    from afd_ray.rewards import RerenderedReward, ServedRewardModel, fixed_reward_input

    other_tokenizer(tmp_path / "tok")
    url = f"http://127.0.0.1:{pooling_server.server_address[1]}"
    pooling_server.script = lambda n: 200
    cfg = load_config("toy", ["model.policy=x", "run.method=rlhf", f"reward.url={url}", f"reward.tokenizer={tmp_path / 'tok'}"])
    rr = fixed_reward_input(cfg, tokenizer, prompt_messages(encoded))
    assert rr.fmt == "chat"
    seqs = SequenceBatch([e.prompt_ids for e in encoded], [e.response_ids for e in encoded])
    scores = RerenderedReward(ServedRewardModel(url, "rm"), rr).score(seqs)
    assert scores.tolist() == [float(len(p) + len(r)) for p, r in zip(*vars(rr.batch(seqs)).values())]
    assert scores.tolist() != [float(len(p) + len(r)) for p, r in zip(seqs.prompts, seqs.responses)]
    same = load_config("toy", ["model.policy=x", "run.method=rlhf", f"reward.url={url}"])
    assert fixed_reward_input(same, tokenizer, {}) is None  # no reward.tokenizer: the policy's ids


def test_a_golden_model_is_scored_in_its_own_chat_template(tokenizer, encoded, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from afd_ray.eval.golden import load_golden

    other_tokenizer(tmp_path / "tok")
    path = other_reward_model(tmp_path / "rm", tmp_path / "tok")
    golden = load_golden(str(path), tokenizer, "auto", prompt_messages(encoded))
    assert golden.fmt == "chat"
    prompts, responses = [e.prompt_ids for e in encoded], [e.response_ids for e in encoded]
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    target = golden.tokenizer
    with torch.no_grad():
        texts = [target.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                            tokenize=False) for q, a in QUESTIONS]
        by_hand = [model(torch.tensor([target(t, add_special_tokens=False, split_special_tokens=False)["input_ids"]]))
                   .logits[0, 0].item() for t in texts]
    assert golden(prompts, responses) == pytest.approx(by_hand, abs=1e-5)
    assert len(set(by_hand)) == 3


@pytest.mark.slow
def test_rlhf_on_a_reward_model_with_another_tokenizer_scores_it_in_its_own_template(
        ray_local, tokenizer, encoded, tmp_path):
    """The reward actor of run.method=rlhf (a scoring replica, no optimizer) holds a model of another
    vocabulary: it gets the re-rendered ids, pads with its own pad token, and scores as the model does in
    process on its own chat template."""
    from transformers import AutoModelForSequenceClassification

    from afd_ray.methods.irl import check_reward_model
    from afd_ray.rewards import RerenderedReward, fixed_reward_input
    from afd_ray.runtime.system import System

    other_tokenizer(tmp_path / "tok")
    path = str(other_reward_model(tmp_path / "rm", tmp_path / "tok"))
    check_reward_model(path)
    cfg = load_config("toy", ["model.policy=x", "run.method=rlhf", f"model.reward={path}", "reward.micro_batch_size=2"])
    rr = fixed_reward_input(cfg, tokenizer, prompt_messages(encoded))
    system = System(cfg, {"reward": path}, tokenizer, [], roles=("reward",), reward_tokenizer=rr.target,
                    fixed_reward=True)
    try:
        assert type(system.handles["reward"]).__name__ == "FixedReward"
        seqs = SequenceBatch([e.prompt_ids for e in encoded], [e.response_ids[:n] for e, n in zip(encoded, (99, 4, 99))])
        scores = RerenderedReward(system.handles["reward"], rr).score(seqs)
    finally:
        system.shutdown()
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        here = [model(torch.tensor([p + r])).logits[0, 0].item() for p, r in map(rr.one, seqs.prompts, seqs.responses)]
    assert scores.tolist() == pytest.approx(here, abs=1e-4)
