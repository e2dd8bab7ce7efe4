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
    target_modules: list[str] = field(default_factory=list)  # empty = every linear of the blocks (lora_targets)


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


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM or reward model, LoRA-wrapped or not: the ModuleList
    directly under the backbone (``model.layers`` of Llama/Mistral/Gemma, ``transformer.h`` of GPT-2,
    ``gpt_neox.layers`` of GPT-NeoX/Pythia)."""
    base = getattr(model, "get_base_model", lambda: model)()
    backbone = getattr(base, base.base_model_prefix, base)
    for child in backbone.children():
        if isinstance(child, torch.nn.ModuleList):
            return child
    raise TypeError(f"{type(base).__name__}: no ModuleList of transformer blocks under {type(backbone).__name__}, "
                    f"so LoRA targets (model.lora_r) and frozen blocks (reward.freeze_layers) cannot be found")


def lora_targets(model) -> list[str]:
    """peft ``target_modules`` for ``model``: the names of the linear layers (``nn.Linear`` and transformers'
    ``Conv1D``) inside its transformer blocks, so attention and MLP get adapters in any architecture (q/k/v/o
    and gate/up/down in Llama, c_attn/c_proj/c_fc in GPT-2, query_key_value/dense/dense_h_to_4h/dense_4h_to_h
    in GPT-NeoX) and the embeddings, LM head and reward head do not.

    peft matches a target against the end of every module name in the model, so the short names (``q_proj``)
    are returned unless a linear outside the blocks shares one; then the blocks' full module names."""
    from transformers.pytorch_utils import Conv1D

    blocks = transformer_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]
    ours = [name for name, m in linear if id(m) in inside]
    if not ours:
        raise TypeError(f"{type(model).__name__}: no linear layers in its transformer blocks to put LoRA on")
    short = sorted({name.rsplit(".", 1)[-1] for name in ours})
    outside = {name.rsplit(".", 1)[-1] for name, m in linear if id(m) not in inside}
    return short if not outside & set(short) else ours


def apply_lora(model, lora: LoraSpec | None, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters when lora.r > 0; otherwise return it unchanged. Without explicit
    ``lora.target_modules`` every linear layer of the transformer blocks is adapted (``lora_targets``)."""
    if lora is None or lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = list(lora.target_modules) or lora_targets(model)
    # GPT-2's Conv1D stores its weight transposed (in, out): peft needs to know to merge it correctly
    conv1d = any(isinstance(m, Conv1D) and any(name == t or name.endswith(f".{t}") for t in targets)
                 for name, m in model.named_modules())
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, task_type=task_type, fan_in_fan_out=conv1d,
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them: the
    activation memory of a step drops from every layer's to one layer's plus the block inputs, for about one
    extra forward of compute. Non-reentrant checkpointing (PyTorch's recommended kind: unlike the reentrant
    one it passes gradients through blocks whose inputs need none); the KV cache is off, as training never
    reuses it.
    When the input embeddings are frozen (LoRA, ``freeze_layers``) their output is made to require a
    gradient, so the checkpointed blocks above them still get one."""
    base = getattr(model, "get_base_model", lambda: model)()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if not base.get_input_embeddings().weight.requires_grad:
        base.enable_input_require_grads()


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


def reward_head(model) -> torch.nn.Module:
    """The scalar head of a sequence-classification model (``score`` for Llama-family and GPT-2 models). Under
    LoRA it is peft's wrapper around the head's trainable copy (``modules_to_save``), which calls like it."""
    base = getattr(model, "get_base_model", lambda: model)()
    for name in ("score", "classifier", "v_head"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
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


def response_logprobs(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, mask_BT: torch.Tensor,
                      position_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(x_{t+1} | x_{<=t}) of a causal LM where ``mask_BT`` is 1, 0 elsewhere: (B, T-1) float32.

    mask_BT: (B, T-1) on the next-token grid (``TokenBatch.shifted_mask``: the response tokens).
    attention_mask_BT / position_ids_BT: passed to the model as they are (a 4-D mask for packed rows).
    The output layer and the float32 log-softmax over the vocabulary run on the masked positions only,
    gathered into one contiguous (N, H) matrix: prompt and padding positions cost nothing past the last
    hidden state. On W1 (SmolLM2-135M bf16, 2 CPU cores, 128 sequences about half prompt) forward + backward
    took 36.8 s with the full logits and 25.3 s so (docs/LOG.md). A model whose logits are not its output
    layer applied to its backbone's last hidden state (soft-capped or scaled logits) gets the full logits;
    this is checked once per model (``output_layer_splits``, which the learners and the reference call when
    they load it).
    """
    from afd_ray.algo.masked import token_logprobs

    base = getattr(model, "get_base_model", lambda: model)()
    mask = mask_BT.bool()
    extra = {} if position_ids_BT is None else {"position_ids": position_ids_BT}
    if not output_layer_splits(base):
        logits = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, **extra).logits[:, :-1]
        return token_logprobs(logits, input_ids_BT[:, 1:]).masked_fill(~mask, 0.0)
    hidden_BTH = getattr(base, base.base_model_prefix)(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                                                        **extra).last_hidden_state
    rows, cols = mask.nonzero(as_tuple=True)
    logits_NV = base.get_output_embeddings()(hidden_BTH[rows, cols])  # (N, H) gathered: one contiguous GEMM
    logp_N = token_logprobs(logits_NV.unsqueeze(1), input_ids_BT[rows, cols + 1].unsqueeze(1)).squeeze(1)
    return torch.zeros(mask.shape, dtype=logp_N.dtype, device=logp_N.device).index_put((rows, cols), logp_N)


def output_layer_splits(base) -> bool:
    """Whether ``base``'s logits are its output layer applied to its backbone's last hidden state, tested
    once on six tokens (False for soft-capped or scaled logits, a missing backbone attribute, ...)."""
    if not hasattr(base, "_afd_output_layer_splits"):
        backbone, head = getattr(base, getattr(base, "base_model_prefix", ""), None), base.get_output_embeddings()
        ok = backbone is not None and head is not None
        if ok:
            device = next(base.parameters()).device
            ids = (torch.arange(6, device=device) % base.config.vocab_size).view(1, -1)
            was_training = base.training
            base.eval()
            with torch.no_grad():
                full = base(input_ids=ids).logits.float()
                split = head(backbone(input_ids=ids).last_hidden_state).float()
            base.train(was_training)
            ok = full.shape == split.shape and torch.allclose(full, split, rtol=1e-3, atol=1e-3)
        base._afd_output_layer_splits = ok
    return base._afd_output_layer_splits


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
