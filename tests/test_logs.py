"""Per-role log files (afd_ray.workers.logs): an actor's output goes to its file, and only afd_ray's warnings
and errors reach the console, prefixed with role and rank."""

import io
import os
import subprocess
import sys

import pytest

from afd_ray.workers import logs

CHILD = """
import logging, os, subprocess, sys
from afd_ray.workers import logs
logs.setup()
print("stdout line")
print("stderr line", file=sys.stderr)
logging.getLogger("afd_ray.workers.x").warning("ours")
logging.getLogger("transformers.y").warning("their warning")
logging.getLogger("transformers.y").error("their error")
subprocess.run([sys.executable, "-c", "print('from a child process')"])
"""


def test_an_actor_process_writes_to_its_file_and_warns_on_the_console(tmp_path):
    env = {**os.environ, **logs.actor_env(tmp_path / "logs", "rollout", 1)}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert out.stderr.splitlines() == ["[rollout-1] WARNING afd_ray.workers.x: ours",
                                       "[rollout-1] ERROR transformers.y: their error"]
    text = (tmp_path / "logs" / "rollout-1.log").read_text()
    for line in ("stdout line", "stderr line", "from a child process"):
        assert line in text


def test_without_a_log_file_nothing_changes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != logs.FILE_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert "stdout line" in out.stdout and "their warning" in out.stderr
    assert logs.actor_env(None, "policy", 0) == {}


def test_a_progress_bar_is_silent_off_a_terminal(capsys):
    from afd_ray.progress import bar, follow, put

    b = bar(10, "SFT", unit="step")  # pytest's stderr is no terminal
    assert b.disable
    b.update(3)
    with follow(b) as q:
        assert q is None  # no queue, no actor
        put(q, {"step": 1})
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_remote_jobs_steps_move_the_drivers_bar(ray_local):
    """The SFT job's rank 0 puts each step's metrics on a Ray queue; a driver thread moves the bar."""
    import time

    from afd_ray.progress import bar, follow, put

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    b = bar(20, "SFT", unit="step", file=tty)
    assert not b.disable
    with follow(b) as q:
        put(q, {"step": 3, "loss": 1.5})
        put(q, {"step": 7, "loss": 1.25})
        deadline = time.time() + 20
        while b.n != 7 and time.time() < deadline:
            time.sleep(0.1)
        assert b.n == 7
        shown = tty.getvalue()
    assert "SFT" in shown and "7/20" in shown and "loss=1.25" in shown
