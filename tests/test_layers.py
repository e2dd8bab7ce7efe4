"""The layering of DESIGN.md Sec. 2, as import-linter contracts in pyproject.toml: each layer imports only
those below it, the math imports no Ray / vLLM / DeepSpeed, no actor or runtime module imports a recipe."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout
