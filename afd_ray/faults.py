"""Fault injection for the reliability tests (docs/RELIABILITY.md): a fault named in ``AFD_RAY_FAULTS``
fires inside the real process at a real call site, so recovery is tested against real deaths and hangs.

    AFD_RAY_FAULTS="rollout.generate@2=kill;reward.score@3=nan+"   AFD_RAY_FAULTS_DIR=/some/dir

``site@k=action`` fires at the k-th call of ``site`` in a process; ``kill`` SIGKILLs the process, ``hang``
sleeps forever, ``nan`` makes the site's output NaN. A fault fires once per run (a marker file in
``AFD_RAY_FAULTS_DIR`` remembers it across the restarted processes); ``nan+`` fires at every call from
the k-th on. With the variable unset every hook is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV, DIR_ENV = "AFD_RAY_FAULTS", "AFD_RAY_FAULTS_DIR"
_calls: dict[str, int] = {}


def env() -> dict[str, str]:
    """The variables to hand to actors (they do not inherit the driver's environment)."""
    return {k: os.environ[k] for k in (ENV, DIR_ENV) if os.environ.get(k)}


def _spec(site: str) -> tuple[int, str] | None:
    for item in os.environ.get(ENV, "").split(";"):
        name, _, rest = item.strip().partition("@")
        if name == site and rest:
            at, _, action = rest.partition("=")
            return int(at), action
    return None


def fires(site: str) -> str | None:
    """Count a call of ``site``; the action to take now, if any."""
    spec = _spec(site)
    if spec is None:
        return None
    _calls[site] = _calls.get(site, 0) + 1
    at, action = spec
    if action.endswith("+"):
        return action[:-1] if _calls[site] >= at else None
    if _calls[site] != at:
        return None
    try:  # created atomically: of the processes that reach the k-th call together (ranks), one fires
        os.close(os.open(Path(os.environ.get(DIR_ENV, ".")) / f".fault-{site}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return action


def point(site: str) -> None:
    """A place where the process can be killed or hung."""
    action = fires(site)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        while True:
            time.sleep(3600)


def corrupt(site: str, tensor):
    """``tensor`` filled with NaN when a ``nan`` fault fires at ``site`` (else unchanged)."""
    return tensor.fill_(float("nan")) if fires(site) == "nan" else tensor
