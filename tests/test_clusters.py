"""clusters/: the `ray up` YAMLs pass Ray's own cluster schema, every job command they name parses, and no
file opens the dashboard's job API (remote code execution) to the network without Ray token auth."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from afd_ray.config import load_config

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LOCAL = CLUSTERS / "local-fake.yaml"  # a local rehearsal on Ray's fake multi-node provider (tests/test_cluster_sim.py)
RAY_UP = sorted(p for p in CLUSTERS.glob("*.yaml") if "kind" not in yaml.safe_load(p.read_text()) and p != LOCAL)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def job_args(text: str) -> list[list[str]]:
    """The arguments after `jobs/irl_ultrachat.py` in every command a file names (comments included)."""
    flat = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [shlex.split(m)[:] for m in re.findall(r"jobs/irl_ultrachat\.py ([^\n]*)", flat)]


def config_of(args: list[str]):
    assert args[0] == "--config"
    return load_config(args[1], args[2:])


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_yaml_passes_the_ray_cluster_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises jsonschema.ValidationError on a bad key
    assert raw["file_mounts"] == {"~/afd_ray": "."}
    assert re.search(r"py3(1[1-9])", raw["docker"]["image"]), "the project needs Python >= 3.11 (pyproject.toml)"
    assert any("pip install" in c and ".[gpu]" in c for c in raw["setup_commands"])
    commands = job_args(path.read_text())
    assert commands, f"{path.name} names no job command"
    for args in commands:
        assert config_of(args).run.device == "gpu"


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_dashboard_listens_on_localhost_only(path):
    """No token auth on these heads, so the dashboard binds loopback and users reach it through the SSH tunnel
    of `ray dashboard` (named in the header). The flag must be explicit: the file shows what it binds."""
    text = path.read_text()
    starts = [c for c in yaml.safe_load(text)["head_start_ray_commands"] if "ray start" in c]
    assert starts, f"{path.name} starts no Ray head"
    for command in starts:
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        assert host and host.group(1) in LOOPBACK, f"{path.name}: the dashboard must bind {LOOPBACK}: {command}"
    assert f"ray dashboard clusters/{path.name}" in text


def test_a_wrong_key_fails_the_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_UP[0].read_text())
    raw["available_node_types"]["head"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(raw))


def test_kuberay_rayjob_runs_a_preset_on_gpu_workers():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["python", "/home/ray/afd_ray/jobs/irl_ultrachat.py"]
    cfg = config_of(args[2:])
    assert cfg.run.output_dir.startswith("/mnt/shared")  # the shared volume: checkpoints survive the pods
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * w["replicas"]
               for w in workers for c in w["template"]["spec"]["containers"])
    from afd_ray.placement import plan

    assert gpus >= plan(cfg).gpus(), f"the preset needs {plan(cfg).gpus()} GPUs, the workers have {gpus}"


def test_kuberay_dashboard_is_on_localhost_or_behind_token_auth():
    """KubeRay binds the dashboard to 0.0.0.0 unless told otherwise; reachable from every pod, it must need
    Ray's token (authOptions, Ray >= 2.52)."""
    spec = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    if host not in LOOPBACK:
        assert spec.get("authOptions", {}).get("mode") == "token", f"dashboard on {host} without token auth"
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), "token auth needs Ray >= 2.52"


def test_the_local_fake_cluster_mirrors_a_shipped_one():
    """clusters/local-fake.yaml passes Ray's schema, runs Ray's fake multi-node provider, and has the worker node
    types of gcp-a100.yaml with logical GPUs; its head (named as the fake provider names it) holds no GPU."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LOCAL.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["provider"]["module"].endswith("fake_multi_node.node_provider.FakeMultiNodeProvider")
    gcp = yaml.safe_load((CLUSTERS / "gcp-a100.yaml").read_text())["available_node_types"]
    types = raw["available_node_types"]
    assert set(types) - {"ray.head.default"} == set(gcp) - {"head"} and raw["head_node_type"] == "ray.head.default"
    assert types["ray.head.default"]["resources"]["GPU"] == 0
    assert all(t["resources"]["GPU"] >= 1 for name, t in types.items() if name != "ray.head.default")
    commands = job_args(LOCAL.read_text())
    assert commands, "local-fake.yaml names no job command"
    for args in commands:
        cfg = config_of(args)
        assert cfg.run.logical_gpus and cfg.run.device == "cpu"
    assert "--dashboard-host=127.0.0.1" in LOCAL.read_text()


def dashboard_keys() -> list[str]:
    """The afd_ray metric keys the Grafana dashboard plots (each target's legend starts with its key)."""
    import json

    dash = json.loads((CLUSTERS / "grafana-afd_ray.json").read_text())
    return [t["legendFormat"].split()[0] for p in dash["panels"] for t in p["targets"]]


def test_grafana_dashboard_queries_the_gauges_telemetry_sets():
    import json

    from afd_ray.telemetry import gauge_name

    dash = json.loads((CLUSTERS / "grafana-afd_ray.json").read_text())
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run"}
    targets = [t for p in dash["panels"] for t in p["targets"]]
    assert len(targets) == len(dashboard_keys()) > 20
    for t, key in zip(targets, dashboard_keys()):  # Prometheus sees Ray's custom metrics with a ray_ prefix
        assert t["expr"] == f'ray_{gauge_name(key)}{{run=~"$run"}}', t
    assert any("throughput/rollout_tokens_per_s" == k for k in dashboard_keys())
