"""Rule rewards: user functions and built-in penalties on the policy's samples, added in the policy step to
the reward model's score (the learned r_phi of IRL, a frozen reward model under ``run.method=rlhf``) or, for
``rlhf`` without ``model.reward``, the whole reward.

    r(x, y) = r_model(x, y) + sum_i w_i f_i(x, y) - missing_eos_penalty * [y cut at max_new_tokens]
              + overlong_penalty_factor * R_length(y)

- ``reward.functions``: ``module:function`` entries with the golden reward's signature,
  ``f(prompts, responses, tokenizer) -> list[float]``, batched, on token ids (the text is
  ``tokenizer.decode``); a function that also takes ``prompt_texts`` / ``response_texts`` keywords (or
  ``**kwargs``) gets the decoded texts (special tokens skipped). ``reward.function_weights`` (empty = 1 each).
- ``reward.missing_eos_penalty``: subtracted from each response that ends without the end-of-sequence token
  (cut at ``rollout.max_new_tokens``), as TRL's ``missing_eos_penalty`` and the TL;DR PPO setups.
- ``reward.overlong_buffer`` (L_cache): DAPO's soft overlong punishment, R_length(y) = 0 up to
  L_max - L_cache tokens, then falling linearly to -1 at L_max = ``rollout.max_new_tokens``.

Each term's batch mean goes to the metrics as ``rules/<name>``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger("afd_ray")


def import_function(spec: str, what: str) -> Callable:
    """The function named by ``module:function``; a ValueError that names ``what`` (the setting) otherwise."""
    module, sep, name = spec.partition(":")
    if not (sep and module and name):
        raise ValueError(f"{what}: {spec!r} is not module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}: cannot import {name} from {module} ({e})") from None
    if not callable(fn):
        raise ValueError(f"{what}: {spec} is not callable")
    return fn


def _takes_texts(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name in ("prompt_texts", "response_texts") for p in params)


@dataclass
class RuleFunction:
    name: str  # the metric name: rules/<name>
    spec: str  # module:function, for errors
    weight: float
    fn: Callable
    texts: bool  # passes prompt_texts / response_texts


class RuleRewards:
    """The configured rule rewards of one run; ``__call__`` scores a batch of samples."""

    def __init__(self, functions: list[RuleFunction], tokenizer, max_new_tokens: int,
                 missing_eos_penalty: float = 0.0, overlong_buffer: int = 0, overlong_penalty_factor: float = 1.0):
        self.functions, self.tokenizer, self.max_new_tokens = functions, tokenizer, max_new_tokens
        self.missing_eos_penalty, self.overlong_buffer = missing_eos_penalty, overlong_buffer
        self.overlong_penalty_factor = overlong_penalty_factor
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> RuleRewards | None:
        """The rules of ``cfg.reward``, each function imported now (a bad entry fails before any actor
        starts); None when no rule is configured."""
        r = cfg.reward
        if not (r.functions or r.missing_eos_penalty or r.overlong_buffer):
            return None
        weights = list(r.function_weights) or [1.0] * len(r.functions)
        functions, names = [], set()
        for i, (spec, w) in enumerate(zip(r.functions, weights)):
            fn = import_function(spec, f"reward.functions[{i}]")
            name = spec.partition(":")[2]
            name = name if name not in names else f"{name}_{i}"
            names.add(name)
            functions.append(RuleFunction(name, spec, float(w), fn, _takes_texts(fn)))
        return cls(functions, tokenizer, cfg.rollout.max_new_tokens, r.missing_eos_penalty, r.overlong_buffer,
                   r.overlong_penalty_factor)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) float32 sum of the weighted rules for each (prompt, response), and ``rules/*`` batch means."""
        n = len(responses)
        total, metrics = torch.zeros(n), {}
        texts = None
        for f in self.functions:
            kwargs = {}
            if f.texts:
                if texts is None:
                    dec = self.tokenizer.batch_decode
                    texts = dec(prompts, skip_special_tokens=True), dec(responses, skip_special_tokens=True)
                kwargs = {"prompt_texts": texts[0], "response_texts": texts[1]}
            values = [float(v) for v in f.fn(prompts, responses, self.tokenizer, **kwargs)]
            if len(values) != n:
                raise ValueError(f"rule reward {f.spec} returned {len(values)} values for {n} responses")
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"rule reward {f.spec} returned {values[bad]} for response {bad}")
            v = torch.tensor(values, dtype=torch.float32)
            total += f.weight * v
            metrics[f"rules/{f.name}"] = float(v.mean()) if n else 0.0
        if self.missing_eos_penalty:
            cut = torch.tensor([float(not r or r[-1] not in self.eos_ids) for r in responses])
            total -= self.missing_eos_penalty * cut
            metrics["rules/missing_eos"] = float(cut.mean()) if n else 0.0
        if self.overlong_buffer:
            length = torch.tensor([float(len(r)) for r in responses])
            r_len = overlong_reward(length, self.max_new_tokens, self.overlong_buffer)
            total += self.overlong_penalty_factor * r_len
            metrics["rules/overlong"] = float(r_len.mean()) if n else 0.0
        return total, metrics


def overlong_reward(length_B: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment R_length: 0 for |y| <= L_max - L_cache, then
    ((L_max - L_cache) - |y|) / L_cache down to -1 at L_max, and -1 beyond (L_max = ``max_tokens``,
    L_cache = ``buffer``)."""
    start = max_tokens - buffer
    return ((start - length_B) / buffer).clamp(min=-1.0, max=0.0)


class ServedRewardModel:
    """r(x, y) from a reward model behind `vllm serve MODEL --runner pooling`: POST ``/pooling`` with the
    token ids of prompt + response (the policy's, or re-rendered into its own by ``RerenderedReward``), task
    ``classify`` without activation, i.e. the raw logit that loading the model in process gives (pooled at
    the last token). Batches of ``batch_size`` sequences, at most ``max_concurrency`` requests at once.
    As the judge client: connection errors, timeouts, HTTP 5xx and unreadable answers are retried with
    exponential backoff; HTTP 400/401/403/404 (a wrong model name or endpoint) stop at once; a batch whose
    retries run out scores NaN, which the loop's non-finite guard skips and counts (``run.max_nonfinite``)."""

    def __init__(self, url: str, model: str = "", batch_size: int = 32, max_concurrency: int = 4,
                 max_retries: int = 4, timeout: float = 60.0, backoff: float = 0.5):
        import httpx

        self.base = url.rstrip("/").removesuffix("/v1")
        self.batch_size, self.max_concurrency, self.max_retries, self.backoff = (batch_size, max_concurrency,
                                                                                  max_retries, backoff)
        self._http = httpx.Client(timeout=timeout)
        self.model = model or self._first_model()
        self.requests = self.retries = self.failed = 0

    def __repr__(self) -> str:
        return f"ServedRewardModel({self.base!r}, model={self.model!r})"

    def _first_model(self) -> str:
        r = self._http.get(f"{self.base}/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def _post(self, ids: list[list[int]]) -> list[float]:
        import httpx

        body = {"model": self.model, "input": ids, "task": "classify", "use_activation": False,
                "add_special_tokens": False}
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random()))
                self.retries += 1
            self.requests += 1
            try:
                r = self._http.post(f"{self.base}/pooling", json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code in (400, 401, 403, 404):  # a wrong model name or endpoint: no retry can help
                    raise ValueError(f"reward.url {self.base}/pooling: HTTP {r.status_code} for model "
                                     f"{self.model!r}: {r.text[:300]}")
                try:
                    r.raise_for_status()
                    rows = sorted(r.json()["data"], key=lambda d: d["index"])
                    values = [float(row["data"][0] if isinstance(row["data"], list) else row["data"]) for row in rows]
                    if len(values) == len(ids):
                        return values
                    problem = f"{len(values)} scores for {len(ids)} sequences"
                except (httpx.HTTPStatusError, KeyError, TypeError, ValueError) as e:
                    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("reward model request failed (%s), attempt %d of %d", problem[:200], attempt + 1,
                        self.max_retries + 1)
        self.failed += 1
        return [float("nan")] * len(ids)

    def score(self, seqs) -> torch.Tensor:
        """(B,) float32 rewards of ``seqs`` (a SequenceBatch); NaN for a batch that failed every attempt."""
        ids = [list(p) + list(r) for p, r in zip(seqs.prompts, seqs.responses)]
        chunks = [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            parts = list(pool.map(self._post, chunks))
        return torch.tensor([v for part in parts for v in part], dtype=torch.float32)

    submit_score = score  # answered at once; the driver's gather passes results through


def fixed_reward_input(cfg, policy_tokenizer, prompts: dict):
    """How run.method=rlhf's fixed reward model (``model.reward`` or ``reward.url``) reads (x, y): None = the
    policy's token ids as they are; else an ``afd_ray.data.render.Rerender`` into its tokenizer
    (``reward.tokenizer``, default model.reward's own) in ``reward.input_format``. ``prompts``: the run's
    prompt messages by token ids (``prompt_messages``)."""
    from transformers import AutoTokenizer

    from afd_ray.data.render import Rerender, resolve_format
    from afd_ray.models.loading import resolve_model_path

    name = cfg.reward.tokenizer or cfg.model.reward
    if not name:
        target = policy_tokenizer
    else:  # as it ships: no stand-in chat template where it has none
        target = AutoTokenizer.from_pretrained(resolve_model_path(name))
        if target.pad_token_id is None:
            target.pad_token = target.eos_token
    fmt = resolve_format(cfg.reward.input_format, policy_tokenizer, target, "reward.input_format")
    return Rerender(policy_tokenizer, target, fmt, prompts) if fmt else None


class RerenderedReward:
    """A reward scorer (the reward group, a served model) fed each (x, y) re-rendered into its own input
    (``rerender``: an ``afd_ray.data.render.Rerender``) from the policy's token ids it is called with."""

    def __init__(self, inner, rerender):
        self.inner, self.rerender = inner, rerender

    def __repr__(self) -> str:
        return f"RerenderedReward({self.inner!r}, {self.rerender.fmt})"

    def submit_score(self, seqs):
        return self.inner.submit_score(self.rerender.batch(seqs))

    def score(self, seqs) -> torch.Tensor:
        return self.inner.score(self.rerender.batch(seqs))
