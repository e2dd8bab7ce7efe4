"""Placement is a pure function of the config."""

import pytest

from afd_ray.config import load_config
from afd_ray.placement import plan


def gpu_shares(p):
    """GPU fraction asked of each colocated bundle, summed over every actor placed on it."""
    n = len(p.groups["colocated"])
    return [sum(s.resources["GPU"] for slots in p.roles.values() for s in slots if s.bundle == b) for b in range(n)]


def test_cpu_layout_packs_every_actor_on_small_cpu_shares():
    p = plan(load_config("cpu", ["policy.world_size=2"]))
    assert p.layout == "cpu" and p.gpus() == 0
    assert {r: len(s) for r, s in p.roles.items()} == {"rollout": 1, "policy": 2, "reward": 1, "reference": 1}
    assert [s.resources for slots in p.roles.values() for s in slots] == [{"CPU": 0.1}] * 5  # 0.5 of a core in all


def test_colocated_two_gpus_share_every_bundle():
    p = plan(load_config("ultrachat-2gpu"))
    assert p.layout == "colocate" and p.gpus() == 2 and list(p.groups) == ["colocated"]
    # GPU 0: policy 0.4 + rollout 0.3 + reward 0.2 + reference 0.1; GPU 1 has no reference
    assert gpu_shares(p) == pytest.approx([1.0, 0.9])
    assert [s.bundle for s in p.roles["policy"]] == [0, 1] and [s.bundle for s in p.roles["rollout"]] == [0, 1]


def test_separate_groups_on_eight_gpus():
    p = plan(load_config("ultrachat-8gpu"))
    assert p.layout == "separate" and p.gpus() == 8
    assert len(p.groups["policy"]) == 4 and len(p.groups["rollout"]) == 2 and len(p.groups["reward"]) == 2
    ref = p.roles["reference"][0]
    assert ref.group == "policy" and ref.bundle == 0
    assert ref.resources["GPU"] + p.roles["policy"][0].resources["GPU"] == pytest.approx(1.0)  # 0.2 + 0.8


def test_colocate_needs_matching_world_sizes():
    cfg = load_config("ultrachat-2gpu", ["rollout.num_workers=1"])
    with pytest.raises(ValueError, match="rollout.num_workers"):
        plan(cfg)


def test_tensor_parallel_engines_take_whole_gpus():
    p = plan(load_config("ultrachat-8gpu", ["rollout.tensor_parallel_size=2"]))
    assert all(b["GPU"] == 2 for b in p.groups["rollout"]) and p.gpus() == 10


def test_a_critic_gets_its_own_ranks_and_fits_the_colocated_gpus():
    cpu = plan(load_config("cpu", ["policy.algo=ppo", "critic.enabled=true"]))
    assert len(cpu.roles["critic"]) == 1 and "critic" not in plan(load_config("cpu")).roles
    p = plan(load_config("ultrachat-2gpu", ["policy.algo=ppo", "critic.enabled=true", "critic.world_size=2"]))
    # policy 0.3 + rollout 0.3 + reward 0.15 + critic 0.15 (+ reference 0.1 on GPU 0)
    assert gpu_shares(p) == pytest.approx([1.0, 0.9])
    sep = plan(load_config("ultrachat-8gpu", ["policy.algo=ppo", "critic.enabled=true", "critic.world_size=2"]))
    assert sep.gpus() == 10 and len(sep.groups["critic"]) == 2
    assert "critic" not in plan(load_config("cpu", ["policy.algo=ppo", "critic.enabled=true"]), ("policy",)).roles


def test_the_rendezvous_point_is_picked_on_the_bundles_node(ray_local):
    import socket

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from afd_ray.workers.group import rendezvous_point

    pg = placement_group([{"CPU": 0.01}], strategy="PACK")
    ray.get(pg.ready())
    try:
        node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        ip, port = rendezvous_point(pg, 0)
        assert ip == next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        with socket.socket() as s:  # free there (this is that node)
            s.bind(("", port))
    finally:
        remove_placement_group(pg)
