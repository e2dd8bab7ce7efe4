"""The job script: argument errors, and a real `ray job submit` against a local head node."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from afd_ray.workers.group import free_port

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "irl_ultrachat.py"


def test_bad_override_exits_2_with_the_key():
    out = subprocess.run([sys.executable, str(JOB), "--config", "cpu", "policy.algo=ppo2"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "policy.algo='ppo2' is not allowed" in out.stderr


def test_a_job_for_one_method_refuses_another():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "sft.py"), "--config", "cpu", "run.method=dpo"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "this job runs run.method=sft; got run.method=dpo" in out.stderr


def test_help_config_lists_keys():
    out = subprocess.run([sys.executable, str(JOB), "--help-config"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "policy.beta" in out.stdout and "rollout.kv_cache_gb" in out.stdout


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(toy_sft, tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the job client would prefer it over --address
    env.pop("RAY_ADDRESS")
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env, capture_output=True,
                   timeout=180)
    try:
        cmd = [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
               sys.executable, "jobs/irl_ultrachat.py", "--config", "toy", f"model.policy={toy_sft}",
               "run.iterations=2", "rollout.prompts_per_iteration=8", f"run.output_dir={tmp_path}", "run.name=job"]
        out = subprocess.run(cmd, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout and "done:" in out.stdout
        assert (tmp_path / "job" / "report.md").is_file()
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
