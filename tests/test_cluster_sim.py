"""The `separate` placement on simulated multi-node clusters (run.logical_gpus=true: Ray's logical GPUs,
CPU compute), first in-process with ``ray.cluster_utils.Cluster``, then along the launch path users take:
a cluster YAML's node types started on this host by Ray's fake multi-node provider, and `ray job submit`."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from afd_ray.config import load_config
from afd_ray.workers.group import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def toy_overrides(sft, out, name):
    """One IRL iteration of the toy task on two engines and two ranks per learner, as small as it goes."""
    return [f"model.policy={sft}", "run.logical_gpus=true", "run.iterations=1", f"run.output_dir={out}",
            f"run.name={name}", "rollout.prompts_per_iteration=4", "rollout.n=2", "policy.mini_batches=1",
            "data.limit=64", "data.heldout=4"]


@pytest.fixture
def three_nodes():
    """A head (the driver only) and two worker nodes of 3 logical GPUs each, every one with its own node id:
    the 6 one-GPU bundles of the plan do not fit on one node."""
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="raysim", dir="/tmp")  # its own: /tmp/ray is other instances' too
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "temp_dir": temp_dir})
    for _ in range(2):
        cluster.add_node(num_cpus=6, num_gpus=3, object_store_memory=300 << 20)
    cluster.wait_for_nodes()
    cluster.connect()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def placement_facts(system) -> dict:
    """Where the run's bundles were reserved and where its actors, rendezvous points and engines are."""
    import ray

    def node_of(_actor):
        return ray.get_runtime_context().get_node_id()

    facts = {"bundles": {name: ray.util.placement_group_table(pg)["bundles_to_node_id"]
                         for name, pg in system.groups.items()},
             "actors": {}, "rendezvous": {}, "engine_diffs": list(getattr(system.sync, "engine_diffs", []))}
    for g in system.actor_groups:
        nodes = ray.get([a.__ray_call__.remote(node_of) for a in g.actors])
        facts["actors"][g.role] = [(slot.group, slot.bundle, node) for slot, node in zip(g.slots, nodes)]
        if g.rendezvous is not None:
            facts["rendezvous"][g.role] = g.rendezvous
    facts["node_ips"] = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return facts


def test_separate_layout_on_three_nodes(three_nodes, toy_sft, tmp_path):
    from afd_ray.methods.irl import IRL, write_report
    from afd_ray.runtime.loop import drive
    from afd_ray.runtime.rundir import RunDir

    cfg = load_config("toy", [*toy_overrides(toy_sft, tmp_path, "sim"), "rollout.num_workers=2",
                              "policy.world_size=2", "reward.world_size=2"])
    rd = RunDir.open(cfg)
    seen: dict = {}

    def report(rd_, cfg_, final):  # the recipe's last step, while every actor of the run is still up
        seen.update(placement_facts(recipe.system))
        write_report(rd_, cfg_, final)

    recipe = IRL(cfg, rd, echo=lambda *_: None, report=report)
    try:
        assert drive(rd, cfg, recipe, echo=lambda *_: None)
    finally:
        rd.close()
    assert rd.latest().iteration == 1 and (rd.latest().path / "policy" / "config.json").is_file()

    roles = seen["actors"]
    assert {r: len(a) for r, a in roles.items()} == {"rollout": 2, "policy": 2, "reward": 2, "reference": 2}
    for role, actors in roles.items():  # every actor runs on the node its bundle was reserved on
        for group, bundle, node in actors:
            assert node == seen["bundles"][group][bundle], f"{role} on {node}, its bundle on another node"
    used = {n for table in seen["bundles"].values() for n in table.values()}
    assert len(used) > 1, "the groups did not spread over the nodes"
    assert three_nodes.head_node.node_id not in used  # the head has no GPU: only the driver runs there
    for role in ("policy", "reward"):  # the store of each DeepSpeed group is bound on its rank 0's node
        point = seen["rendezvous"][role]
        group, bundle, node = roles[role][0]
        assert point.node_id == node == seen["bundles"][group][bundle]
        assert point.addr == seen["node_ips"][node] and point.port > 0
    assert len(seen["engine_diffs"]) == 2, "WeightSync.engine_diffs: one per engine after each check"
    assert all(d <= cfg.run.sync_check_tol for d in seen["engine_diffs"])


def processes_of(marks: list[str]) -> list:
    """This user's processes of one Ray cluster: those whose arguments name one of ``marks`` (its temp dir,
    which every Ray process of it names, and its GCS address), and their children (workers and agents, which
    rename themselves)."""
    import psutil

    named = re.compile("|".join(re.escape(m) + r"(?![\w.-])" for m in marks))  # not a longer name's prefix
    found = {}
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            if p.info["uids"].real == os.getuid() and any(named.search(a) for a in p.info["cmdline"] or []):
                found.update({c.pid: c for c in (p, *p.children(recursive=True))})
        except (psutil.Error, TypeError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(marks: list[str]) -> None:
    """`ray down` for the fake cluster: end its processes by id (`ray stop` would end every Ray process of
    this user on the machine, other clusters' too)."""
    import psutil

    procs = processes_of(marks)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_ray_job_on_the_local_fake_cluster(toy_sft, tmp_path):
    """The launch path: the head of clusters/local-fake.yaml (as `ray up` starts it on a head node) whose
    autoscaler starts the worker nodes, then `ray job submit` of one toy IRL iteration on logical GPUs. The
    job's 3 one-GPU bundles (engine, policy, reward) cannot fit on one 2-GPU node: it runs on two."""
    import ray

    port, dash = free_port(), free_port()
    ip = ray.util.get_node_ip_address()
    config = yaml.safe_load((ROOT / "clusters" / "local-fake.yaml").read_text())
    config["provider"]["gcs_address"] = f"{ip}:{port}"  # a free port: 6379 may be another cluster's
    variant = tmp_path / "local-fake.yaml"
    variant.write_text(yaml.safe_dump(config))
    temp_dir = tempfile.mkdtemp(prefix="rayfake", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=0",
                        "--num-gpus=0", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                        f"--temp-dir={temp_dir}", f"--autoscaling-config={variant}", "--disable-usage-stats"],
                       check=True, env=dict(env, RAY_FAKE_CLUSTER="1"), capture_output=True, timeout=180)
        status = ""
        deadline = time.monotonic() + 180
        while "0.0/4.0 GPU" not in status and time.monotonic() < deadline:  # both worker nodes up
            time.sleep(3)
            status = subprocess.run([RAY, "status", f"--address={ip}:{port}"], env=dict(env, RAY_AUTH_MODE="token"),
                                    capture_output=True, text=True, timeout=60).stdout
        assert "0.0/4.0 GPU" in status and " 2 gpu-2xa100" in status and "launching" not in status, status
        # no --working-dir (the fake nodes would each unpack it into the same folder): the installed project
        cmd = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--", sys.executable,
               str(ROOT / "jobs" / "irl_ultrachat.py"), "--config", "toy", *toy_overrides(toy_sft, tmp_path, "job")]
        out = subprocess.run(cmd, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout and "done:" in out.stdout
        assert (tmp_path / "job" / "report.md").is_file()
    finally:
        stop_cluster([temp_dir, f"{ip}:{port}"])
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_of([temp_dir, f"{ip}:{port}"])
