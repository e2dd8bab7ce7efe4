"""Per-role log files (afd_ray.workers.logs): an actor's output goes to its file, and only afd_ray's warnings
and errors reach the console, prefixed with role and rank."""

import os
import subprocess
import sys

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
