"""Placement is a pure function of the config; so are the weight-sync backend and the NCCL communicators."""

import pytest

from afd_ray.config import ConfigError, load_config
from afd_ray.placement import Gpu, Plan, Slot, check_communicators, communicators, plan, sync_backend


def gpu_shares(p):
    """GPU fraction asked of each colocated bundle, summed over every actor (and TP worker) placed on it."""
    asked = p.gpu_asked()
    return [asked.get(("colocated", b), 0.0) for b in range(len(p.groups["colocated"]))]


def test_cpu_layout_packs_every_actor_on_small_cpu_shares():
    p = plan(load_config("cpu", ["policy.world_size=2"]))
    assert p.layout == "cpu" and p.gpus() == 0
    assert {r: len(s) for r, s in p.roles.items()} == {"rollout": 1, "policy": 2, "reward": 1, "reference": 1}
    assert [s.resources for slots in p.roles.values() for s in slots] == [{"CPU": 0.1}] * 5  # 0.5 of a core in all
    assert all(s.env == {} and s.workers == [s.bundle] for slots in p.roles.values() for s in slots)
    assert sync_backend(load_config("cpu")) == "gloo"
    # phases run one at a time: each role's actors split the cores (Ray would give every actor one thread),
    # and independent calls of different roles (score, reference) are made one after another too
    assert [p.omp_threads(r, 16) for r in ("policy", "reward", "reference")] == [8, 16, 16]
    assert not p.overlaps


def test_colocated_two_gpus_share_every_bundle():
    p = plan(load_config("ultrachat-2gpu"))
    assert p.layout == "colocate" and p.gpus() == 2 and list(p.groups) == ["colocated"]
    # each GPU: policy 0.4 + rollout 0.3 + reward 0.2 + a reference replica 0.1
    assert gpu_shares(p) == pytest.approx([1.0, 1.0])
    assert [s.bundle for s in p.roles["policy"]] == [0, 1] and [s.bundle for s in p.roles["rollout"]] == [0, 1]
    assert [s.bundle for s in p.roles["reference"]] == [0, 1]


def test_separate_groups_on_eight_gpus():
    p = plan(load_config("ultrachat-8gpu"))
    assert p.layout == "separate" and p.gpus() == 8 and p.overlaps  # score and reference at once
    assert len(p.groups["policy"]) == 4 and len(p.groups["rollout"]) == 2 and len(p.groups["reward"]) == 2
    # a reference replica on every policy GPU: 0.8 + 0.2 each
    assert [(s.group, s.bundle) for s in p.roles["reference"]] == [("policy", i) for i in range(4)]
    assert all(p.gpu_asked()[("policy", i)] == pytest.approx(1.0) for i in range(4))
    assert p.omp_threads("policy", 96) == 1 == p.omp_threads("reference", 96)  # the CPUs of their slots


def test_colocate_needs_matching_world_sizes():
    cfg = load_config("ultrachat-2gpu", ["rollout.num_workers=1"])
    with pytest.raises(ValueError, match="rollout.num_workers"):
        plan(cfg)


def test_separate_tensor_parallel_engines_get_one_gpu_bundle_per_worker():
    p = plan(load_config("ultrachat-8gpu", ["rollout.tensor_parallel_size=2"]))
    assert p.groups["rollout"] == [{"GPU": 1, "CPU": 1}] * 4 and p.gpus() == 10  # vLLM: at most 1 GPU a bundle
    e0, e1 = p.roles["rollout"]
    assert (e0.workers, e1.workers) == ([0, 1], [2, 3]) and (e0.bundle, e1.bundle) == (0, 2)
    assert e0.resources == {"CPU": 1} and e0.starts_workers  # the engine holds no GPU; its workers do
    assert e0.env == {"VLLM_RAY_PER_WORKER_GPUS": "1", "VLLM_RAY_BUNDLE_INDICES": "0,1"}
    assert e1.env["VLLM_RAY_BUNDLE_INDICES"] == "2,3"
    assert all(v == pytest.approx(1.0) for v in p.gpu_asked().values())


def test_colocated_tensor_parallel_engines_spread_their_share_over_their_bundles():
    p = plan(load_config("ultrachat-2gpu", ["rollout.num_workers=1", "rollout.tensor_parallel_size=2"]))
    (engine,) = p.roles["rollout"]
    assert engine.group == "colocated" and engine.workers == [0, 1] and "GPU" not in engine.resources
    assert engine.env == {"VLLM_RAY_PER_WORKER_GPUS": "0.3", "VLLM_RAY_BUNDLE_INDICES": "0,1"}
    assert gpu_shares(p) == pytest.approx([1.0, 1.0])  # 0.3 of each GPU, by a worker instead of the engine
    tp1 = plan(load_config("ultrachat-2gpu"))  # tp 1: the engine actor holds its share itself
    assert [s.resources["GPU"] for s in tp1.roles["rollout"]] == [0.3, 0.3]
    assert not any(s.starts_workers or s.env for s in tp1.roles["rollout"])


def test_a_critic_gets_its_own_ranks_and_fits_the_colocated_gpus():
    cpu = plan(load_config("cpu", ["policy.algo=ppo", "critic.enabled=true"]))
    assert len(cpu.roles["critic"]) == 1 and "critic" not in plan(load_config("cpu")).roles
    p = plan(load_config("ultrachat-2gpu", ["policy.algo=ppo", "critic.enabled=true", "critic.world_size=2"]))
    # policy 0.3 + rollout 0.3 + reward 0.15 + critic 0.15 + reference 0.1
    assert gpu_shares(p) == pytest.approx([1.0, 1.0])
    sep = plan(load_config("ultrachat-8gpu", ["policy.algo=ppo", "critic.enabled=true", "critic.world_size=2"]))
    assert sep.gpus() == 10 and len(sep.groups["critic"]) == 2
    assert "critic" not in plan(load_config("cpu", ["policy.algo=ppo", "critic.enabled=true"]), ("policy",)).roles


def colocated_grid():
    for n in (1, 2, 4, 8):
        for tp in (1, 2, 4):
            if n % tp == 0:
                for critic in (False, True):
                    yield n, tp, critic


def grid_id(case):
    return "-".join(str(v) for v in case)


def critic_overrides(critic: bool, world: int) -> list[str]:
    return ["policy.algo=ppo", "critic.enabled=true", f"critic.world_size={world}"] if critic else []


def assert_one_rank_per_gpu(p, backend):
    groups = communicators(p, backend)
    for name, ranks in groups.items():
        assert len(set(ranks)) == len(ranks), f"{name}: two ranks on one GPU: {ranks}"
    for (group, bundle), asked in p.gpu_asked().items():
        assert asked <= p.groups[group][bundle]["GPU"] + 1e-9, f"{group}[{bundle}] asked {asked}"
    return groups


@pytest.mark.parametrize("case", list(colocated_grid()), ids=grid_id)
def test_colocated_grid_has_one_rank_per_gpu_in_every_communicator(case):
    n, tp, critic = case
    cfg = load_config("ultrachat-2gpu", [f"policy.world_size={n}", f"reward.world_size={n}",
                                         f"rollout.num_workers={n // tp}", f"rollout.tensor_parallel_size={tp}",
                                         *critic_overrides(critic, n)])
    p = plan(cfg)
    assert sync_backend(cfg) == "ipc"
    groups = assert_one_rank_per_gpu(p, "ipc")
    assert set(groups) == {"policy", "reward"} | ({"critic"} if critic else set())  # no nccl weight sync
    workers = [w for s in p.roles["rollout"] for w in s.workers]
    assert sorted(workers) == list(range(n))  # every GPU runs one engine worker
    assert len(p.roles["reference"]) == n


def separate_grid():
    for n in (1, 2, 4, 8):
        for tp in (1, 2, 4):
            for engines in (1, 2):
                for critic in (False, True):
                    yield n, tp, engines, critic


@pytest.mark.parametrize("case", list(separate_grid()), ids=grid_id)
def test_separate_grid_has_one_rank_per_gpu_in_every_communicator(case):
    n, tp, engines, critic = case
    cfg = load_config("ultrachat-8gpu", [f"policy.world_size={n}", f"reward.world_size={max(1, n // 2)}",
                                         f"rollout.num_workers={engines}", f"rollout.tensor_parallel_size={tp}",
                                         *critic_overrides(critic, 2)])
    p = plan(cfg)
    assert sync_backend(cfg) == "nccl"
    groups = assert_one_rank_per_gpu(p, "nccl")
    assert len(groups["weight_sync"]) == 1 + engines * tp
    assert groups["weight_sync"][0] == Gpu("policy", 0) and len(p.roles["reference"]) == n
    bundles = [w for s in p.roles["rollout"] for w in s.workers]
    assert sorted(bundles) == list(range(engines * tp))  # TP slots name distinct bundles


def test_an_nccl_weight_sync_in_a_colocated_layout_is_refused():
    p = plan(load_config("ultrachat-2gpu"))
    with pytest.raises(ConfigError, match="weight_sync communicator would put ranks 0 and 1 on one GPU"):
        check_communicators(p, "nccl")  # learner rank 0 and engine 0's worker share GPU 0
    hand = Plan("separate", {"policy": [{"GPU": 1, "CPU": 2}]},
                {"policy": [Slot("policy", 0, {"GPU": 0.5}), Slot("policy", 0, {"GPU": 0.5})]})
    with pytest.raises(ConfigError, match="the policy communicator would put ranks 0 and 1 on one GPU"):
        check_communicators(hand, "nccl")


def test_logical_gpus_use_the_separate_layout_and_compute_on_cpu():
    cfg = load_config("cpu", ["run.logical_gpus=true", "rollout.num_workers=2", "policy.world_size=2",
                              "reward.world_size=2"])
    p = plan(cfg)
    assert p.layout == "separate" and p.gpus() == 6 and sync_backend(cfg) == "gloo" and p.overlaps
    assert [len(s) for s in p.roles.values()] == [2, 2, 2, 2]  # rollout, policy, reference, reward
    for bad, key in (("run.device=gpu", "run.device=gpu"), ("run.colocate=true", "run.colocate=true")):
        with pytest.raises(ConfigError, match=f"run.logical_gpus=true .* needs run.device=cpu and "
                                              f"run.colocate=false, got .*{key}"):
            load_config("cpu", ["run.logical_gpus=true", bad])


def test_the_rendezvous_point_is_picked_on_the_bundles_node(ray_local):
    import socket

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from afd_ray.workers.group import rendezvous_point

    pg = placement_group([{"CPU": 0.01}], strategy="PACK")
    ray.get(pg.ready())
    try:
        node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        point = rendezvous_point(pg, 0)
        assert point.node_id == node_id
        assert point.addr == next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        with socket.socket() as s:  # free there (this is that node)
            s.bind(("", point.port))
    finally:
        remove_placement_group(pg)
