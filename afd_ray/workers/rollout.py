"""RolloutWorker: one vLLM engine per actor. Verbs: generate, prompt_logprobs, sleep, wake_up, and vLLM's
weight-transfer protocol (init_weight_transfer_engine, start_weight_update, update_weights,
finish_weight_update, weight_version), driven by learner rank 0 (afd_ray/workers/transfer.py)."""

from __future__ import annotations

import os

from afd_ray import faults
from afd_ray.types import Samples, SamplingSpec

# importing it registers the gloo weight-transfer backend; the worker process imports it too (extension)
EXTENSION = "afd_ray.workers.transfer.WorkerExtension"


class RolloutWorker:
    """A vLLM engine. On CPU it runs in-process (no engine subprocess) and binds its OpenMP threads to
    ``omp_threads_bind`` (vLLM-CPU otherwise reserves a core: 35 s vs 19.7 s on 2 cores, DESIGN.md Sec. 7)."""

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 gpu_memory_utilization: float = 0.15, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 device: str = "cpu", omp_threads_bind: str = "auto", kv_cache_gb: float = 0.0,
                 sleep_mode: bool = False, sync_backend: str = "gloo", sleep_level: int = 1,
                 max_num_batched_tokens: int = 0):
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_threads_bind)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from afd_ray.workers import transfer  # noqa: F401  (registers the gloo backend in this process)

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        max_model_len = min(max_model_len, limit) if limit else max_model_len
        self.tp, self.sleep_level = tensor_parallel_size, sleep_level
        # TP > 1 on GPUs: vLLM's Ray executor places the workers on the placement-group bundles named by
        # VLLM_RAY_BUNDLE_INDICES (set by the placement plan; the actor holds no GPU itself, so it is named
        # explicitly); on CPU, worker processes of this actor (left to itself, vLLM would pick Ray inside a
        # capturing placement group)
        executor = ("ray" if device != "cpu" else "mp") if tensor_parallel_size > 1 else None
        # Seeded sampling (every rollout is seeded) and chunked prefill cannot meet on CPU: after a partial
        # prefill vLLM rewinds the request's generator (gpu_model_runner._bookkeeping_sync), which a CPU
        # generator refuses. Without chunking a prompt that does not fit a step's budget waits for the next
        # step; the budget must then hold the longest sequence.
        budget = {}
        if device == "cpu":
            budget["enable_chunked_prefill"] = False
            if max_num_batched_tokens:
                budget["max_num_batched_tokens"] = max(max_num_batched_tokens, max_model_len)
        elif max_num_batched_tokens:
            budget["max_num_batched_tokens"] = max_num_batched_tokens
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                       tensor_parallel_size=tensor_parallel_size, worker_extension_cls=EXTENSION,
                       distributed_executor_backend=executor,
                       weight_transfer_config=WeightTransferConfig(backend=sync_backend),
                       enable_prefix_caching=False, enable_sleep_mode=sleep_mode,
                       kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)) if kv_cache_gb else None, **budget)

    def generate(self, requests: list[tuple[list[list[int]], SamplingSpec] | None]) -> list[Samples | None]:
        """Sample every request (prompts, spec) in one engine call, so requests with different specs (the
        training samples and the held-out probe) share the engine's batches; one Samples per request."""
        from vllm import SamplingParams, TokensPrompt

        faults.point("rollout.generate")
        prompts, params = [], []
        for prompt_ids, spec in (r for r in requests if r is not None):
            # one seed per prompt: a single shared seed would give every prompt the same random stream
            prompts += [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
            params += [SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                                      max_tokens=spec.max_tokens, logprobs=0,
                                      seed=None if spec.seed is None else spec.seed * 100_003 + i)
                       for i in range(len(prompt_ids))]
        outputs = iter(self.llm.generate(prompts, params, use_tqdm=False) if prompts else [])
        result = []
        for request in requests:
            if request is None:
                result.append(None)
                continue
            prompt_ids, spec = request
            responses, logprobs = [], []
            for _ in prompt_ids:
                for c in next(outputs).outputs:
                    responses.append(list(c.token_ids))
                    logprobs.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            result.append(Samples(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses,
                                  logprobs=logprobs, n=spec.n))
        return result

    def prompt_logprobs(self, sequences: list[list[int]], start: list[int]) -> list[list[float]]:
        """log pi(x_t | x_<t) for t >= start[i] of each sequence (the response part), as vLLM computes it."""
        from vllm import SamplingParams, TokensPrompt

        faults.point("rollout.prompt_logprobs")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        result = []
        for out, seq, s in zip(outs, sequences, start):
            result.append([out.prompt_logprobs[t][seq[t]].logprob for t in range(s, len(seq))])
        return result

    def sleep(self) -> None:
        """Colocated on a GPU with the learners: free the KV cache and offload the weights (level 1) or
        drop them (level 2: the next wake-up must be followed by a weight sync) while they train."""
        self.llm.sleep(level=self.sleep_level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def tensor_parallel_size(self) -> int:
        return self.tp

    # ---- vLLM's weight-transfer protocol (called by learner rank 0's trainer engine) -------------------------

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version=version)

    def weight_version(self) -> str | None:
        return self.llm.get_weight_version()

    def scale_weights(self, name_part: str, factor: float) -> int:
        """Multiply the weights whose name holds ``name_part`` (tests: an engine with corrupted weights)."""
        return sum(self.llm.collective_rpc("afd_scale_weights", args=(name_part, factor)))
