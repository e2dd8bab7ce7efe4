"""A toy alignment task with an exactly computable golden reward, small enough for tests on 2 cores.

Prompt x: BOS, four random digits, ":". Response y: eight digits, then EOS. The golden reward is the
fraction of the eight response positions holding a digit of the same parity as the prompt's first digit:

    r*(x, y) = (1/8) * sum_{t<8} [ y_t is a digit and y_t = x_1 (mod 2) ]

The expert (the demonstrations) matches the parity with probability ``match_prob`` per position (0.9 by
default, so E[r*] = 0.9); uniform digits score 0.5.

Two variants. ``toy`` (responses end with EOS): a tiny Llama with the SmolLM2 tokenizer behaviour-cloned
from scratch for 60 steps learns the parity rule early (~0.93 of the digits it writes) but stops too soon
(7.0 tokens on average against the demonstrations' 9), so what IRL fixes there is mostly length.
``toy-fixed`` (no EOS; responses are exactly eight new tokens): length carries no signal, and a 40-step
pi_SFT (golden ~0.74: ~0.76 of its digits match, ~3% are not digits) leaves the parity rule itself for the
reward model to learn and the policy step to exploit (docs/LOG.md).
"""

from __future__ import annotations

import torch

from afd_ray.data.tokenize import Encoded, EncodedPreference

LENGTH = 8
PROMPT_DIGITS = 4
# data source name -> how its items are made: responses end with EOS; a heterogeneous demonstrator's format
SOURCES = {"toy": {"eos": True}, "toy-fixed": {"eos": False}, "toy-styled": {"eos": True, "style": True}}
STYLE_MARK = "."


def digit_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    if len(set(ids)) != 10 or tokenizer.unk_token_id in ids:
        raise ValueError("the toy task needs a tokenizer with one token per digit 0-9")
    return ids


def _end(tokenizer, eos: bool, style: bool) -> list[int]:
    return ([tokenizer.convert_tokens_to_ids(STYLE_MARK)] if style else []) + ([tokenizer.eos_token_id] if eos else [])


def make_demonstrations(tokenizer, n: int, seed: int = 0, match_prob: float = 0.9,
                        eos: bool = True, style: bool = False) -> list[Encoded]:
    """n expert demonstrations as token ids (no chat template: the toy model is trained from scratch).
    ``eos=False``: the fixed-length variant, responses are the eight digits alone (sampling stops at eight
    new tokens), so length carries no signal and only the parity rule separates a policy from the expert.
    ``style=True`` (``toy-styled``): a heterogeneous demonstrator (seeds/000 Sec. 3.2): the same responses
    each closed by a format mark (STYLE_MARK) that the golden reward ignores and a pi_SFT behaviour-cloned
    on ``toy`` never writes, as a stronger model's surface habits that the aligned model's class lacks."""
    digits = digit_ids(tokenizer)
    sep = tokenizer.convert_tokens_to_ids(":")
    g = torch.Generator().manual_seed(seed)
    end = _end(tokenizer, eos, style)
    out = []
    for i in range(n):
        x = torch.randint(0, 10, (PROMPT_DIGITS,), generator=g).tolist()
        parity = x[0] % 2
        y = []
        for _ in range(LENGTH):
            match = bool(torch.rand((), generator=g) < match_prob)
            pool = [d for d in range(10) if (d % 2 == parity) == match]
            y.append(pool[int(torch.randint(0, len(pool), (), generator=g))])
        prompt = [tokenizer.bos_token_id] + [digits[d] for d in x] + [sep]
        out.append(Encoded(prompt, [digits[d] for d in y] + end, False, "toy", i))
    return out


def make_preferences(tokenizer, n: int, seed: int = 0, vary_length: bool = True, eos: bool = True,
                     style: bool = False, annotator_temperature: float = 0.0) -> list[EncodedPreference]:
    """n preference triples (prompt, chosen, rejected) ranked by the golden reward: two responses per
    prompt, each with its own parity-match probability in [0.2, 0.95] and (``vary_length``) its own length
    of 4-8 digits, as a partly trained policy writes them; the higher golden reward is chosen (ties are
    redrawn). ``vary_length=False``: always 8 digits, so only the parity rule separates the pair.
    ``eos=False``: no end token, as in the fixed-length variant (implies ``vary_length=False``).
    ``style``: both responses closed by the format mark, as ``make_demonstrations``.
    ``annotator_temperature`` tau > 0: noisy labels (seeds/000 Sec. 1: annotators of two responses of one
    model are "highly uncertain and noisy"): a Bradley-Terry annotator prefers a over b with probability
    sigmoid((r*(a) - r*(b)) / tau), so close pairs are near coin flips; 0 = the golden ranking itself."""
    vary_length = vary_length and eos
    end = _end(tokenizer, eos, style)
    digits = digit_ids(tokenizer)
    sep = tokenizer.convert_tokens_to_ids(":")
    g = torch.Generator().manual_seed(10_000 + seed)

    def response(parity: int) -> list[int]:
        p = 0.2 + 0.75 * float(torch.rand((), generator=g))
        length = int(torch.randint(4, LENGTH + 1, (), generator=g)) if vary_length else LENGTH
        y = []
        for _ in range(length):
            match = bool(torch.rand((), generator=g) < p)
            pool = [d for d in range(10) if (d % 2 == parity) == match]
            y.append(pool[int(torch.randint(0, len(pool), (), generator=g))])
        return y

    out = []
    while len(out) < n:
        x = torch.randint(0, 10, (PROMPT_DIGITS,), generator=g).tolist()
        a, b = response(x[0] % 2), response(x[0] % 2)
        hits = [sum(d % 2 == x[0] % 2 for d in y) for y in (a, b)]
        if hits[0] == hits[1]:
            continue
        first = hits[0] > hits[1]
        if annotator_temperature > 0:
            p_first = torch.sigmoid(torch.tensor((hits[0] - hits[1]) / LENGTH / annotator_temperature))
            first = bool(torch.rand((), generator=g) < p_first)
        chosen, rejected = (a, b) if first else (b, a)
        prompt = [tokenizer.bos_token_id] + [digits[d] for d in x] + [sep]
        out.append(EncodedPreference(prompt, [digits[d] for d in chosen] + end, [digits[d] for d in rejected] + end,
                                     "toy", len(out)))
    return out


def golden_reward(prompts: list[list[int]], responses: list[list[int]], tokenizer) -> list[float]:
    """r*(x, y) for each pair, exactly (module docstring)."""
    value = {tid: d for d, tid in enumerate(digit_ids(tokenizer))}
    scores = []
    for p, r in zip(prompts, responses):
        parity = value[p[1]] % 2
        hits = sum(1 for t in r[:LENGTH] if t in value and value[t] % 2 == parity)
        scores.append(hits / LENGTH)
    return scores


def sft_from_scratch(out_dir, tokenizer_path, demos: list[Encoded], steps: int = 150, lr: float = 3e-3,
                     batch_size: int = 64, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """Build a tiny random Llama and behaviour-clone ``demos`` for ``steps`` AdamW steps, in-process.

    The toy's pi_SFT: deliberately short training, so it falls short of the expert (module docstring:
    60 steps for ``toy``, 40 for ``toy-fixed``). ``hidden_size=128`` with 20 steps is the LoRA variant:
    at width 64 the model is 97% tied embeddings, which LoRA leaves alone, and what pi_SFT lacks sits
    mostly there; at 128 the blocks carry enough of the rule for adapters on them to move it (docs/LOG.md).
    Returns the HF-format folder.
    """
    from pathlib import Path

    from afd_ray.algo.losses import sft_loss
    from afd_ray.data.tokenize import collate
    from afd_ray.models.loading import load_policy, load_tokenizer, response_logprobs, save_model
    from afd_ray.models.tiny import build_tiny_llama

    out = Path(out_dir)
    init = build_tiny_llama(out / "init", tokenizer_path, hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=hidden_size // 32, intermediate_size=2 * hidden_size, seed=seed)
    model = load_policy(str(init))
    tokenizer = load_tokenizer(str(init))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(demos), (batch_size,), generator=g).tolist()
        b = collate([demos[i].prompt_ids for i in idx], [demos[i].response_ids for i in idx], tokenizer.pad_token_id)
        loss = sft_loss(response_logprobs(model, b.input_ids, b.attention_mask, b.shifted_mask), b.shifted_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(model, tokenizer, out / "sft")


def reward_model_from_preferences(out_dir, init_path, tokenizer, prefs: list[EncodedPreference], steps: int = 60,
                                  lr: float = 1e-3, batch_size: int = 64, seed: int = 0):
    """A Bradley-Terry reward model (seeds/004 Eq. 13) on the backbone of ``init_path`` (a new scalar head),
    trained in-process on ``prefs`` (``make_preferences``: golden-ranked pairs) and saved in HF format to
    ``out_dir``: a reward model that is not the run's own, for ``run.method=rlhf``. Returns the folder."""
    from afd_ray.algo.losses import pairwise_reward_loss
    from afd_ray.data.tokenize import collate
    from afd_ray.models.loading import load_reward_model, reward_forward, save_model

    model = load_reward_model(str(init_path), seed=seed).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(prefs), (batch_size,), generator=g).tolist()
        prompts = [prefs[i].prompt_ids for i in idx]
        b = collate(prompts + prompts, [prefs[i].chosen_ids for i in idx] + [prefs[i].rejected_ids for i in idx],
                    tokenizer.pad_token_id)
        r = reward_forward(model, b.input_ids, b.attention_mask)
        loss = pairwise_reward_loss(r[:batch_size], r[batch_size:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(model.eval(), tokenizer, out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m afd_ray.toy OUT_DIR [--fixed]``: build the toy task's pi_SFT, ready for the presets."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m afd_ray.toy", description="Build the toy task's pi_SFT (a tiny "
                                "Llama behaviour-cloned from scratch) for the `toy` / `toy-fixed` presets.")
    p.add_argument("out", help="output folder (the model lands in OUT/sft)")
    p.add_argument("--fixed", action="store_true", help="the fixed-length variant (preset toy-fixed)")
    p.add_argument("--steps", type=int, default=0, help="SFT steps (default: 60, or 40 with --fixed)")
    p.add_argument("--hidden-size", type=int, default=64, help="model width (128 with --steps 20: the pi_SFT "
                   "for LoRA runs, model.lora_r=16)")
    p.add_argument("--demonstrations", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from afd_ray.models.loading import load_tokenizer
    from afd_ray.models.offline import smollm2_path

    tokenizer_path = smollm2_path()
    demos = make_demonstrations(load_tokenizer(str(tokenizer_path)), a.demonstrations, seed=a.seed, eos=not a.fixed)
    path = sft_from_scratch(a.out, tokenizer_path, demos, steps=a.steps or (40 if a.fixed else 60), batch_size=32,
                            seed=a.seed, hidden_size=a.hidden_size)
    preset = "toy-fixed" if a.fixed else "toy"
    print(f"pi_SFT: {path}\nrun: python jobs/irl_ultrachat.py --config {preset} model.policy={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
