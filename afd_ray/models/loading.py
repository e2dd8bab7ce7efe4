"""Load the three model roles by local path or Hub id.

- policy / reference: any HF causal LM (``AutoModelForCausalLM``); the reference is frozen.
- reward: a causal-LM backbone with a scalar head, stored in HF format as ``*ForSequenceClassification``
  with ``num_labels=1`` so any HF user can load it. afd_ray pools the head at the last attended token
  itself (from the attention mask), so left or right padding and pad == eos tokenizers score correctly.

The name ``smollm2-offline`` stands for the offline default (``afd_ray.models.offline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

OFFLINE_DEFAULT = "smollm2-offline"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft). r = 0 means full fine-tuning."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline alias to its converted folder; pass anything else (path or Hub id) through."""
    if name_or_path == OFFLINE_DEFAULT:
        from afd_ray.models.offline import smollm2_path

        return str(smollm2_path())
    return name_or_path


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# For base models without a chat template (GPT-2, Pythia): the HH-RLHF dialogue format, each assistant
# turn closed by the eos token (the end of turn the rollout engines stop at).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}")


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token (eos when the model has none), left padding for generation, and a chat
    template (``PLAIN_CHAT_TEMPLATE`` for base models that ship none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def apply_lora(model, lora: LoraSpec | None, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters when lora.r > 0; otherwise return it unchanged."""
    if lora is None or lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type=task_type,
    )
    return get_peft_model(model, config)


def load_policy(name_or_path: str, dtype: str = "float32", lora: LoraSpec | None = None):
    """Trainable causal LM (optionally LoRA-wrapped)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
    return apply_lora(model, lora)


def load_reference(name_or_path: str, dtype: str = "float32"):
    """Frozen causal LM in eval mode: pi_ref."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
    model.eval().requires_grad_(False)
    return model


def load_reward_model(name_or_path: str, dtype: str = "float32", lora: LoraSpec | None = None, seed: int = 0):
    """Reward model r_phi: ``*ForSequenceClassification`` (num_labels = 1) from a causal LM or a saved RM.

    From a plain causal LM the head is new; it is initialised N(0, 1/(H+1)) from ``seed`` so runs repeat.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    fresh_head = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    config.num_labels = 1
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch_dtype(dtype))
    if fresh_head:
        gen = torch.Generator().manual_seed(seed)
        head = reward_head(model)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / (config.hidden_size + 1) ** 0.5)
    return apply_lora(model, lora, task_type="SEQ_CLS")


def reward_head(model) -> torch.nn.Linear:
    """The scalar head of a sequence-classification model (``score`` for Llama-family models)."""
    base = getattr(model, "get_base_model", lambda: model)()
    for name in ("score", "classifier", "v_head"):
        if isinstance(getattr(base, name, None), torch.nn.Linear):
            return getattr(base, name)
    raise TypeError(f"{type(base).__name__} has no scalar head named score/classifier/v_head")


def reward_forward(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """r_phi(x, y) for a padded batch: the head applied at the last attended token. Returns (B,) float32."""
    base = getattr(model, "get_base_model", lambda: model)()
    backbone = getattr(base, base.base_model_prefix)
    hidden_BTH = backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
    positions_BT = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device).expand_as(input_ids_BT)
    last_B = (positions_BT * attention_mask_BT.long()).argmax(1)
    pooled_BH = hidden_BTH[torch.arange(hidden_BTH.shape[0], device=hidden_BTH.device), last_B]
    return reward_head(model)(pooled_BH).squeeze(-1).float()


def token_values(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """A critic's V at every position: the scalar head on each hidden state. Returns (B, T) float32
    (V[:, t] values the state after token t, i.e. before token t + 1 is generated)."""
    base = getattr(model, "get_base_model", lambda: model)()
    backbone = getattr(base, base.base_model_prefix)
    hidden_BTH = backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
    return reward_head(model)(hidden_BTH).squeeze(-1).float()


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """HF-format save of a (possibly LoRA) model with merged weights, via a temp folder + rename."""
    import copy
    import os
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is an ordinary folder
    try:
        # merge_and_unload strips the adapters in place, so merge a copy and keep training the original.
        to_save = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)  # the new folder appears whole or not at all
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
