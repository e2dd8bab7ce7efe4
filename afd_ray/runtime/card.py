"""Model cards: the README.md of every HF folder a recipe checkpoints (policy, reward model, critic), so a
folder taken out of a run says what it is, how it was made and how to load and serve it."""

from __future__ import annotations

from pathlib import Path

import yaml

from afd_ray.config import Config
from afd_ray.runtime.files import atomic_write

KINDS = {  # role -> (what it is, the transformers class that loads it)
    "policy": ("the policy (a causal language model)", "AutoModelForCausalLM"),
    "reward": ("the reward model r_phi (a scalar head: one logit, the reward of a whole response)",
               "AutoModelForSequenceClassification"),
    "critic": ("the value model of PPO (a scalar head; per-token values)", "AutoModelForSequenceClassification"),
}
SHOWN = ("rollout/reward", "rollout/kl", "heldout/reward_accuracy", "heldout/reward_gap", "golden/heldout_policy",
         "golden/heldout_demos", "reward/loss", "reward/accuracy", "policy/loss", "loss", "heldout/preference_accuracy",
         "sft/loss", "sft/heldout_nll")


def model_card(cfg: Config, role: str, base: str, metrics: dict[str, float], iteration: int, run: str,
               unit: str = "iteration") -> str:
    """The card's text: base model, method, data, the iteration's metrics, loading and serving, the config."""
    what, cls = KINDS[role]
    rl = role == "policy" and cfg.run.method in ("irl", "aihf", "inverse_rlignment")
    method = cfg.run.method + (f", policy algo {cfg.policy.algo}" if rl else "")
    rows = [f"| {k} | {metrics[k]:.4g} |" for k in SHOWN if k in metrics]
    serve = ("vllm serve PATH          # GPU\n"
             "python -m afd_ray.eval.serve serve PATH --port 8000 --kv-cache-memory-bytes 1G   # vLLM-CPU"
             if role == "policy" else
             "vllm serve PATH --runner pooling   # a pooling model: its score endpoints give the reward")
    use = (f"from transformers import AutoTokenizer, {cls}\n\n"
           "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n"
           f"model = {cls}.from_pretrained(\"PATH\")")
    if role != "policy":
        use += ("\n# the reward of a response: the (prompt, response) chat rendered by the tokenizer's template\n"
                "inputs = tokenizer.apply_chat_template(messages, return_dict=True, return_tensors=\"pt\")\n"
                "reward = model(**inputs).logits[0, 0]")
    header = yaml.safe_dump({"library_name": "transformers", "base_model": base,
                             "tags": ["afd_ray", cfg.run.method, role]}, sort_keys=False)
    return "\n".join([
        "---", header.rstrip(), "---", "",
        f"# {role} of the afd_ray run `{run}`, {unit} {iteration}", "",
        f"This folder holds {what}, trained by afd_ray ({method}) from `{base}` on the demonstrations "
        f"`{cfg.data.demonstrations}`" + (f" and the preferences `{cfg.data.preferences}`" if cfg.data.preferences
                                          else "") + f", in {cfg.model.dtype}" +
        (f" with LoRA r {cfg.model.lora_r} (merged into these weights)" if cfg.model.lora_r else "") + ".", "",
        f"## Metrics at {unit} {iteration}", "",
        *(["| metric | value |", "| --- | --- |", *rows] if rows else ["(none recorded)"]), "",
        "## Use", "", "PATH is this folder.", "", "```python", use, "```", "", "```bash", serve, "```", "",
        "## Config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""])


def write_model_card(hf_dir: Path, cfg: Config, role: str, base: str, metrics: dict[str, float],
                     iteration: int, run: str, unit: str = "iteration") -> None:
    """README.md in ``hf_dir`` (written whole or not at all)."""
    atomic_write(Path(hf_dir) / "README.md", model_card(cfg, role, base, metrics, iteration, run, unit))
