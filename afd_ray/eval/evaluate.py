"""Evaluate run directories or HF checkpoints against each other (jobs/evaluate.py).

For each target (a run directory of any recipe, or an HF model path): its curves (reward, KL, held-out
accuracy, golden per iteration) and Best-of-N table when it is a run directory; responses of its policy on
the evaluation prompts, their golden reward (mean, s.e.) and win rate against the baseline target; the
pairwise judge's win / tie / lose against the baseline; the reward accuracy of its reward model on
preference pairs; MT-Bench-style grades. Writes eval.json, report.md, PNG plots and plots.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afd_ray.data.tokenize import Encoded

log = logging.getLogger("afd_ray")


@dataclass
class Target:
    name: str
    policy: str
    reward: str | None = None
    run_dir: Path | None = None
    metrics: list[dict] = field(default_factory=list)
    best_of_n: list[dict] | None = None


DEMONSTRATIONS = "demonstrations"


def resolve_target(arg: str) -> Target:
    """A run directory (its final policy and reward model), an HF causal LM path / Hub id, or
    ``demonstrations``: the held-out demonstrations themselves as responses (no model), the baseline of
    seeds/002's win rate against the demonstrations."""
    if arg == DEMONSTRATIONS:
        return Target(DEMONSTRATIONS, "")
    p = Path(arg)
    if not (p / "config.yaml").is_file():
        return Target(name=p.name or arg, policy=arg)
    from afd_ray.runtime.rundir import RunDir

    rd = RunDir(p)
    policy = reward = None
    last = rd.latest()
    if last is not None:
        policy = str(last.path / "policy")
        reward = str(last.path / "reward") if (last.path / "reward").is_dir() else None  # spin, dpo: none
    for candidate in ("rl_policy", "policy", "sft/model"):  # recipes that save one final model
        if policy is None and (p / candidate / "config.json").is_file():
            policy = str(p / candidate)
    if reward is None and (p / "reward_model" / "config.json").is_file():
        reward = str(p / "reward_model")
    if policy is None and (p / "bon.json").is_file():
        policy = json.loads((p / "bon.json").read_text())["sft_path"]  # Best-of-N samples pi_SFT
    if policy is None:
        raise FileNotFoundError(f"{p}: a run directory without a policy model (no checkpoint, policy/ or sft/)")
    bon = json.loads((p / "bon.json").read_text())["best_of_n"] if (p / "bon.json").is_file() else None
    return Target(p.name, policy, reward, p, rd.metrics(), bon)


@torch.no_grad()
def generate(policy, prompts: list[list[int]], pad_token_id: int, eos_token_id: int, max_new_tokens: int,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 16, desc: str = "generate") -> list[list[int]]:
    """One response per prompt (token ids, ending at eos when the model stopped), HF generate in-process.
    ``policy``: a model path, or a model already loaded (callers that generate many times)."""
    from afd_ray.data.tokenize import left_pad
    from afd_ray.models.loading import load_policy
    from afd_ray.progress import bar

    model = load_policy(policy).eval() if isinstance(policy, str) else policy
    torch.manual_seed(seed)
    out = []
    with bar(len(prompts), desc, unit="prompt") as progress:
        for i in range(0, len(prompts), batch_size):
            ids, mask = left_pad(prompts[i:i + batch_size], pad_token_id)
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kw)[:, ids.shape[1]:]
            for row in gen.tolist():
                out.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
            progress.update(len(gen))
    return out


def generate_vllm(policy: str, prompts: list[list[int]], tokenizer, max_new_tokens: int, temperature: float = 1.0,
                  seed: int = 0, device: str = "cpu", dtype: str = "float32",
                  gpu_memory_utilization: float = 0.85) -> list[list[int]]:
    """One response per prompt from a short-lived vLLM engine (a Ray actor, as the IRL loop's rollout
    workers); temperature 0 is greedy. Much faster than ``generate`` for large models and many prompts."""
    from afd_ray.config import load_config
    from afd_ray.runtime.system import ensure_ray, sample_once

    overrides = [f"run.device={device}", f"model.dtype={dtype}", f"rollout.max_new_tokens={max_new_tokens}",
                 f"data.max_prompt_tokens={max(map(len, prompts), default=1)}"]  # the engine's context fits every prompt
    if device == "gpu":
        overrides.append(f"rollout.gpu_memory_utilization={gpu_memory_utilization}")
    cfg = load_config(None, overrides)
    ensure_ray()
    return sample_once(cfg, policy, prompts, tokenizer, seed, temperature=temperature)


def chat_fn_for(policy: str, tokenizer, max_new_tokens: int):
    """``chat_fn(messages) -> text`` of a local policy (greedy), for MT-Bench answers."""
    from afd_ray.data.tokenize import render_prompt_ids
    from afd_ray.models.loading import load_policy

    model = load_policy(policy).eval()  # once, not per turn

    def chat(messages):
        ids = render_prompt_ids(tokenizer, messages)
        resp = generate(model, [ids], tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens, 0.0)[0]
        return tokenizer.decode(resp, skip_special_tokens=True)

    return chat


def evaluate(targets: list[Target], prompts: list[Encoded], tokenizer, out_dir: Path, *, golden: str = "",
             golden_format: str = "auto",
             baseline: int = 0, judge: dict | None = None, preferences: str = "", mtbench: str = "",
             max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0, engine: str = "hf",
             device: str = "cpu", dtype: str = "float32") -> dict:
    from afd_ray.data.render import prompt_messages
    from afd_ray.eval.golden import load_golden, mean_se, win_rate
    from afd_ray.eval.report import plot_best_of_n, plot_judge, plot_run_curves, write_report

    pj = None
    if judge:  # first: a key that must not go to this URL stops the evaluation before any generation
        from afd_ray.eval.judge import PairwiseJudge

        pj = PairwiseJudge(**judge)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"targets": {t.name: {"policy": t.policy, "reward": t.reward} for t in targets},
                    "prompts": len(prompts)}
    plots: dict[str, dict] = {}
    sections: list[tuple[str, list[str]]] = []
    for t in targets:  # what the runs recorded
        if t.metrics:
            plots[f"curves_{t.name}.png"] = plot_run_curves(t.metrics, out_dir / f"curves_{t.name}.png", t.name)
        if t.best_of_n:
            plots[f"best_of_n_{t.name}.png"] = plot_best_of_n(t.best_of_n, out_dir / f"best_of_n_{t.name}.png",
                                                              f"Best-of-N: {t.name}")
    texts = {}
    if prompts:
        prompt_ids = [e.prompt_ids for e in prompts]
        if engine not in ("hf", "vllm"):
            raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r}")
        responses = {}
        for t in targets:
            if not t.policy:  # the demonstrations
                responses[t.name] = [e.response_ids for e in prompts]
            elif engine == "vllm":
                responses[t.name] = generate_vllm(t.policy, prompt_ids, tokenizer, max_new_tokens, temperature, seed,
                                                  device, dtype)
            else:
                responses[t.name] = generate(t.policy, prompt_ids, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                             max_new_tokens, temperature, seed, desc=f"generate {t.name}")
        texts = {name: [tokenizer.decode(r, skip_special_tokens=True) for r in rs] for name, rs in responses.items()}
        base = targets[baseline].name
        lines = ["| policy | response length | golden (± s.e.) | golden win rate vs " + base + " |", "|---|---|---|---|"]
        scorer = load_golden(golden, tokenizer, golden_format, prompt_messages(prompts)) if golden else None
        gold = {name: scorer(prompt_ids, rs) for name, rs in responses.items()} if scorer else {}
        for t in targets:
            rs = responses[t.name]
            row = {"response_length": sum(map(len, rs)) / len(rs)}
            if gold:
                m, se = mean_se(gold[t.name])
                w, wse = win_rate(gold[t.name], gold[base])
                row |= {"golden": m, "golden_se": se, "golden_win_rate": w, "golden_win_rate_se": wse}
            result["targets"][t.name] |= row
            lines.append(f"| {t.name} | {row['response_length']:.1f} | "
                         + (f"{row['golden']:.3f} ± {row['golden_se']:.3f} | {row['golden_win_rate']:.3f} ± "
                            f"{row['golden_win_rate_se']:.3f} |" if gold else "- | - |"))
        sections.append((f"Responses on {len(prompts)} prompts", lines))
        with open(out_dir / "responses.jsonl.tmp", "w") as f:
            for i, e in enumerate(prompts):
                f.write(json.dumps({"prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=True),
                                    **{name: texts[name][i] for name in texts}}) + "\n")
        (out_dir / "responses.jsonl.tmp").replace(out_dir / "responses.jsonl")
    if pj and prompts:
        prompt_text = [tokenizer.decode(e.prompt_ids, skip_special_tokens=True) for e in prompts]
        base = targets[baseline].name
        verdicts = {}
        for t in targets:
            if t.name == base:
                continue
            verdicts[t.name] = pj.compare(prompt_text, texts[t.name], texts[base], desc=f"judge {t.name}").summary()
        result["judge"] = {"baseline": base, "template": pj.template, "model": judge["model"], "results": verdicts}
        if verdicts:
            plots["judge.png"] = plot_judge(verdicts, out_dir / "judge.png", f"judge vs {base}")
            sections.append((f"Pairwise judge vs {base} ({judge['model']}, both orders)", [
                "| policy | win | tie | lose | failed | tokens (prompt / completion) |", "|---|---|---|---|---|---|",
                *[f"| {n} | {v['win']:.3f} ± {v['win_se']:.3f} | {v['tie']:.3f} | {v['lose']:.3f} ± {v['lose_se']:.3f} "
                  f"| {v['failed']:.0f} | {v['prompt_tokens']:.0f} / {v['completion_tokens']:.0f} |"
                  for n, v in verdicts.items()]]))
    if preferences:
        from afd_ray.eval.accuracy import hf_reward_scorer, load_preference_pairs, reward_accuracy

        pairs, subsets = load_preference_pairs(preferences, tokenizer)
        lines = ["| reward model | accuracy (± s.e.) | pairs |", "|---|---|---|"]
        result["reward_accuracy"] = {}
        for t in targets:
            if t.reward:
                acc = reward_accuracy(hf_reward_scorer(t.reward, tokenizer.pad_token_id), pairs, subsets)
                result["reward_accuracy"][t.name] = acc
                lines.append(f"| {t.name} | {acc['accuracy']:.3f} ± {acc['accuracy_se']:.3f} | {acc['pairs']:.0f} |")
        sections.append((f"Reward accuracy on `{preferences}`", lines))
    if mtbench:
        if not pj:
            raise ValueError("MT-Bench grading needs a judge endpoint (--judge-url, --judge-model)")
        from afd_ray.eval.mtbench import answer_questions, grade, load_questions

        questions = load_questions(mtbench)
        result["mt_bench"] = {}
        lines = ["| policy | mean (± s.e.) | turn 1 | turn 2 | failed |", "|---|---|---|---|---|"]
        for t in (t for t in targets if t.policy):  # the demonstrations answer no MT-Bench question
            answers = answer_questions(chat_fn_for(t.policy, tokenizer, max_new_tokens), questions)
            g = grade(pj.client, questions, answers).summary()
            result["mt_bench"][t.name] = g
            lines.append(f"| {t.name} | {g['mean']:.2f} ± {g['mean_se']:.2f} | {g.get('turn1', float('nan')):.2f} | "
                         f"{g.get('turn2', float('nan')):.2f} | {g['failed']:.0f} |")
        sections.append((f"MT-Bench-style grades ({len(questions)} questions)", lines))
    for t in targets:
        if t.best_of_n:
            sections.append((f"Best-of-N: {t.name}", [json.dumps(r) for r in t.best_of_n]))
    from afd_ray.runtime.files import atomic_write

    atomic_write(out_dir / "eval.json", json.dumps(result, indent=1))
    write_report(out_dir, "Evaluation", sections, plots)
    return result
