"""Shared fixtures: the offline default model (converted once into the user cache), tiny models, a scripted
reward-model endpoint."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    from afd_ray.models.offline import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from afd_ray.models.loading import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    from afd_ray.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", smollm2_dir, seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the real-actor tests of one module (2 CPUs, no dashboard). Per module, so
    the `ray start --head` test can stop its own head without taking a shared instance down with it."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    if not ray.is_initialized():
        from afd_ray.runtime.system import local_ray_env

        local_ray_env()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"},
                              "worker_process_setup_hook": "afd_ray.workers.logs.setup"})  # as ensure_ray
    yield ray
    ray.shutdown()
    for k, v in saved.items():  # this instance's settings end with it
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def toy_sft(tmp_path_factory, smollm2_dir, tokenizer):
    """The toy task's pi_SFT: a tiny Llama behaviour-cloned for 60 steps from scratch (~20 s)."""
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 1024, seed=0)
    return toy.sft_from_scratch(tmp_path_factory.mktemp("toy"), smollm2_dir, demos, steps=60, batch_size=32)


@pytest.fixture(scope="session")
def toy_fixed_sft(tmp_path_factory, smollm2_dir, tokenizer):
    """pi_SFT of the fixed-length toy (eight digits, no EOS): 40 steps from scratch (~12 s), golden ~0.74,
    short of the expert's 0.9 on the parity rule itself (afd_ray/toy.py)."""
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 1024, seed=0, eos=False)
    return toy.sft_from_scratch(tmp_path_factory.mktemp("toy_fixed"), smollm2_dir, demos, steps=40, batch_size=32)


@pytest.fixture(scope="session")
def toy_fixed_lora_sft(tmp_path_factory, smollm2_dir, tokenizer):
    """pi_SFT of the fixed-length toy for LoRA runs: width 128 (at 64 the model is 97% tied embeddings,
    which LoRA leaves alone), 20 steps from scratch, golden ~0.66 (afd_ray/toy.py)."""
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 1024, seed=0, eos=False)
    return toy.sft_from_scratch(tmp_path_factory.mktemp("toy_fixed_lora"), smollm2_dir, demos, steps=20,
                                batch_size=32, hidden_size=128)


@pytest.fixture(scope="session")
def toy_init(tmp_path_factory, smollm2_dir, tokenizer):
    """The toy task's pi_init for Inverse-RLignment: the same from-scratch run stopped at 20 steps, far
    enough from pi_SFT (60) that the Init-SFT discriminator's pairs tell apart (held-out pairwise accuracy
    ~0.97; at 40 steps 0.60, a weak reward: docs/LOG.md)."""
    from afd_ray import toy

    demos = toy.make_demonstrations(tokenizer, 1024, seed=0)
    return toy.sft_from_scratch(tmp_path_factory.mktemp("toy_init"), smollm2_dir, demos, steps=20, batch_size=32)


class ScriptedPooling(BaseHTTPRequestHandler):
    """POST /pooling answered by ``self.server.script(call_no) -> status``: 200 scores sequence i as its
    length (the body holds the token ids), other statuses an error."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.calls += 1
            n = self.server.calls
        status = self.server.script(n)
        payload = {"data": [{"index": i, "data": [float(len(x))]} for i, x in enumerate(body["input"])]}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(payload if status == 200 else {"error": "boom"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def pooling_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedPooling)
    srv.lock, srv.calls = threading.Lock(), 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


class Scripted(BaseHTTPRequestHandler):
    """/v1/chat/completions answered by ``self.server.script(prompt_text, call_no) -> (status, body, delay)``;
    a delay of None holds the answer until the test ends (a request that times out on any machine)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        with self.server.lock:
            self.server.calls[text] = self.server.calls.get(text, 0) + 1
            self.server.auth.add(self.headers.get("Authorization"))
            n = self.server.calls[text]
        status, payload, delay = self.server.script(text, n)
        if delay is None:
            self.server.release.wait()
        time.sleep(delay or 0)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args):
        pass


def answer(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}


@pytest.fixture
def server():
    """A scripted OpenAI-compatible chat server (``srv.script`` set by the test)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.lock, srv.calls, srv.auth, srv.release = threading.Lock(), {}, set(), threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
