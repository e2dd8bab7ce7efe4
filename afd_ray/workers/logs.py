"""Per-role log files: every actor writes its stdout and stderr (vLLM's, DeepSpeed's and transformers' logs,
load bars, native warnings) to ``RUN_DIR/logs/<role>-<rank>.log``; only warnings of afd_ray's own loggers
and errors of the loggers that propagate to the root reach the driver's console (through Ray's log streaming), each prefixed with its
role and rank. ``run.verbose=true`` leaves the actors' output as it is (all of it on the console).

The redirection happens when Ray starts the actor's worker process (``setup``, its
``worker_process_setup_hook``), before the actor's own module imports, so library handlers created at
import time write to the file too; processes the actor starts (vLLM's engine core) inherit it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FILE_ENV = "AFD_RAY_LOG_FILE"  # where this worker process's output goes
NAME_ENV = "AFD_RAY_LOG_NAME"  # its role and rank, the console prefix
HOOK = "afd_ray.workers.logs.setup"


def run_log_dir(cfg) -> Path | None:
    """``RUN_DIR/logs`` of a named run, where its actors write; None under ``run.verbose`` (all to the console)."""
    if not cfg.run.name or cfg.run.verbose:
        return None
    return Path(cfg.run.output_dir) / cfg.run.name / "logs"


def actor_env(log_dir: str | Path | None, role: str, rank: int | None) -> dict[str, str]:
    """The environment variables that send actor ``role``-``rank``'s output to its file (none: unchanged);
    rank None: every process of ``role`` shares ``role.log``."""
    if log_dir is None:
        return {}
    name = role if rank is None else f"{role}-{rank}"
    return {FILE_ENV: str(Path(log_dir) / f"{name}.log"), NAME_ENV: name}


class _ForConsole(logging.Filter):
    """afd_ray's own warnings, and errors of any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] == "afd_ray"


def setup() -> None:
    """Ray's worker process setup hook: file descriptors 1 and 2 to the file named by ``AFD_RAY_LOG_FILE``
    (appended: a restarted actor continues its file), and a console handler on the original stderr."""
    path = os.environ.get(FILE_ENV)
    if not path:
        return
    name = os.environ.get(NAME_ENV, "actor")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(console)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_ForConsole())
    handler.setFormatter(logging.Formatter(f"[{name}] %(levelname)s %(name)s: %(message)s"))
    # on the root logger: loggers that keep their records to themselves (vLLM's, DeepSpeed's) write only to
    # the file; their errors reach the driver as the failed call's exception
    logging.getLogger().addHandler(handler)
