"""What every benchmark records next to its numbers: config, machine, commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def save(name: str, config: dict, results: dict, out_dir: str | Path | None = None) -> Path:
    """Print and write ``benchmarks/results/<name>-<time>.json`` (or into out_dir)."""
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit(),
              "machine": machine(), "config": config, "results": results}
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return path
