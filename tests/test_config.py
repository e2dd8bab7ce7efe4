"""Config: presets parse, overrides coerce, every field is documented, errors name the key and choices."""

import dataclasses

import pytest

from afd_ray.config import Config, ConfigError, describe, field_docs, load_config, native_bf16, presets


def test_presets_load():
    assert {"cpu", "ultrachat-2gpu", "ultrachat-8gpu", "hh-harmless", "hh-helpful", "tldr-ppo", "toy"} <= set(presets())
    for name in presets():
        load_config(name)  # every preset validates
    cpu = load_config("cpu")
    assert cpu.model.policy == "smollm2-offline" and cpu.data.demonstrations == "offline:chitchat-questions"
    assert load_config("ultrachat-8gpu").model.policy == "HuggingFaceH4/mistral-7b-sft-beta"


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert "policy.beta" in describe()


def test_overrides_are_typed():
    cfg = load_config("cpu", ["policy.lr=3e-6", "rollout.n=8", "run.colocate=false", "policy.zero_stage=3",
                              "data.demonstrations=my.jsonl"])
    assert cfg.policy.lr == 3e-6 and cfg.rollout.n == 8 and cfg.policy.zero_stage == 3
    assert cfg.data.demonstrations == "my.jsonl"


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy:\n  algo: online_dpo\nrun:\n  iterations: 2\n")
    cfg = load_config(str(path))
    assert cfg.policy.algo == "online_dpo" and cfg.run.iterations == 2
    path.write_text("policy: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'policy' must be a mapping"):
        load_config(str(path))


@pytest.mark.parametrize("override, needle", [
    (["policy.algo=sft"], "policy.algo='sft' is not allowed; choose one of ['rloo', 'grpo'"),
    (["policy.algoo=rloo"], "unknown config key 'policy.algoo'; did you mean ['policy.algo'"),
    (["rollout.n=two"], "rollout.n='two' must be an integer"),
    (["rollout.n=1"], "rollout.n must be >= 2"),
    (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),
    (["run.colocate=true"], "run.colocate=true"),
    (["run.method=dpo"], "set data.preferences"),
    (["policy.dual_clip=0.5"], "policy.dual_clip must be 0 (off) or > 1"),
    (["nokey"], "must look like section.key=value"),
    (["policy.zero_stage=1"], "choose one of [2, 3]"),
    (["policy.warmup_steps=-1"], "policy.warmup_steps must be >= 0, got -1"),
])
def test_bad_values_name_key_and_choices(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", override)
    assert needle in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpu'; presets:"):
        load_config("gpu")


@pytest.mark.parametrize("override, needle", [
    (["policy.lr=inf"], "policy.lr must be a finite number, got inf"),
    (["policy.lr=.nan"], "policy.lr must be a finite number, got nan"),
    (["rollout.temperature=nan"], "rollout.temperature must be a finite number"),
    (["run.sync_check_tol=inf"], "run.sync_check_tol must be a finite number"),
    (["run.call_timeout_s=inf"], "run.call_timeout_s must be a finite number"),
    (["reward.lr=0"], "reward.lr must be > 0, got 0.0"),
    (["sft.lr=-1e-5"], "sft.lr must be > 0"),
    (["critic.lr=0"], "critic.lr must be > 0"),
    (["policy.dpo_beta=0"], "policy.dpo_beta must be > 0"),
    (["run.sync_check_tol=-0.1"], "run.sync_check_tol must be > 0"),
    (["policy.chosen_nll_weight=-0.1"], "policy.chosen_nll_weight must be >= 0"),
    (["policy.importance_cap=0.5"], "policy.importance_cap must be 0 (off) or >= 1"),
    (["reward.updates_per_iteration=-2"], "reward.updates_per_iteration must be >= -1"),
    (["reward.epochs=2"], "set reward.updates_per_iteration=0 with it"),
    (["run.async_rollout=true", "run.device=gpu", "run.colocate=true"], "set run.colocate=false"),
    (["run.async_rollout=true", "run.method=spin"], "run.async_rollout=true is for the RL loop"),
    (["run.async_rollout=true", "policy.algo=online_dpo"], "policy.algo=online_dpo has none"),
    (["policy.weight_decay=-0.01"], "policy.weight_decay must be >= 0"),
    (["sft.weight_decay=-0.01"], "sft.weight_decay must be >= 0"),
    (["policy.grad_clip=-1"], "policy.grad_clip must be >= 0"),
    (["reward.grad_clip=-1"], "reward.grad_clip must be >= 0"),
    (["sft.grad_clip=-1"], "sft.grad_clip must be >= 0"),
    (["critic.vf_coef=-0.1"], "critic.vf_coef must be >= 0"),
    (["critic.value_clip=-0.2"], "critic.value_clip must be >= 0"),
    (["reward.margin=-1"], "reward.margin must be >= 0"),
    (["reward.freeze_layers=-1"], "reward.freeze_layers must be >= 0"),
    (["policy.dpo_min_gap=-1"], "policy.dpo_min_gap must be >= 0"),
    (["sft.max_steps=-1"], "sft.max_steps must be >= 0"),
    (["bon.rm_prompts=-1"], "bon.rm_prompts must be >= 0"),
    (["bon.rl_iterations=-1"], "bon.rl_iterations must be >= 0"),
    (["model.lora_alpha=0"], "model.lora_alpha must be > 0"),
    (["model.lora_r=8", "model.lora_alpha=-16"], "model.lora_alpha must be > 0"),
    (["run.max_restarts=-1"], "run.max_restarts must be >= 0"),
    (["run.call_timeout_s=-1"], "run.call_timeout_s must be >= 0"),
    (["run.max_nonfinite=0"], "run.max_nonfinite must be >= 1"),
    (["sft.max_failures=-2"], "sft.max_failures must be >= 0, or -1"),
    (["data.max_skip_fraction=1.5"], "data.max_skip_fraction must be in [0, 1]"),
    (["data.max_skip_fraction=-0.1"], "data.max_skip_fraction must be in [0, 1]"),
    (["rollout.kv_cache_gb=-1"], "rollout.kv_cache_gb must be >= 0"),
])
def test_numbers_that_cannot_be_meant_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", override)
    assert needle in str(err.value)


def test_edge_numbers_that_can_be_meant_are_accepted():
    cfg = load_config("cpu", ["run.call_timeout_s=0", "run.max_restarts=0", "data.max_skip_fraction=1",
                              "sft.max_failures=-1", "policy.grad_clip=0", "policy.chosen_nll_weight=0"])
    assert cfg.run.call_timeout_s == 0 and cfg.sft.max_failures == -1


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "/tmp/x", "a\\b", ".hidden", "..", "x..y"])
def test_run_names_that_leave_the_output_dir_are_refused(name):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", [f"run.name={name}"])
    assert f"run.name={name!r} must be a plain folder name inside run.output_dir" in str(err.value)
    assert load_config("cpu", ["run.name=my-run_2.v1"]).run.name == "my-run_2.v1"


@pytest.mark.parametrize("text, key, lines", [
    ("policy:\n  lr: 1.0e-6\nrun:\n  iterations: 2\npolicy:\n  algo: grpo\n", "'policy'", "lines 1 and 5"),
    ("policy:\n  lr: 1.0e-6\n  beta: 0.1\n  lr: 2.0e-6\n", "'policy.lr'", "lines 2 and 4"),
    ("bon:\n  n: [1, 2]\n  n: [4]\n", "'bon.n'", "lines 2 and 3"),
])
def test_a_key_given_twice_in_yaml_names_file_key_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and f"{key} is given twice ({lines})" in str(err.value)


@pytest.mark.parametrize("preset, overrides, cluster, needle", [
    ("ultrachat-8gpu", [], {"CPU": 64.0, "GPU": 4.0}, "needs 12 CPU, 8 GPU but the cluster has 64 CPU, 4 GPU"),
    ("ultrachat-8gpu", ["rollout.tensor_parallel_size=2"], {"CPU": 64.0, "GPU": 8.0},
     "rollout (rollout): 4 x {1 CPU, 1 GPU}"),
    ("ultrachat-8gpu", [], {"CPU": 8.0, "GPU": 8.0}, "short of CPU."),
    ("ultrachat-2gpu", [], {"CPU": 16.0}, "colocated (rollout, policy, reward, reference): 2 x {2 CPU, 1 GPU}"),
    ("ultrachat-2gpu", [], {"CPU": 16.0, "GPU": 1.0}, "short of GPU"),
])
def test_a_world_larger_than_the_cluster_is_refused(preset, overrides, cluster, needle):
    from afd_ray.placement import check_fits, plan

    p = plan(load_config(preset, overrides))
    with pytest.raises(ConfigError) as err:
        check_fits(p, cluster)
    assert needle in str(err.value) and "policy.world_size" in str(err.value)
    check_fits(p, {"CPU": 1000.0, "GPU": 1000.0, "memory": 1e12})  # the same plan fits a bigger cluster
    check_fits(plan(load_config("cpu")), {"CPU": 1.0})  # the CPU layout asks for 0.1 CPU per actor


CPU_AUTO = "bfloat16" if native_bf16() else "float32"  # auto on this host's CPU


@pytest.mark.parametrize("preset, overrides, dtype", [
    (None, [], CPU_AUTO),                                      # the default: auto on run.device=cpu
    (None, ["run.device=gpu"], "bfloat16"),                    # auto on a GPU
    (None, ["run.device=gpu", "model.dtype=float16"], "float16"),
    ("cpu", [], CPU_AUTO),
    ("tldr-ppo", ["model.dtype=auto"], "bfloat16"),
    ("toy", [], "float32"),                                    # pinned: its thresholds are float32 numbers
])
def test_model_dtype_auto_resolves_to_the_device_dtype(preset, overrides, dtype):
    cfg = load_config(preset, overrides)
    assert cfg.model.dtype == dtype  # every reader gets a concrete dtype
    assert Config().model.dtype == "auto"
    # and the sync check's tolerance follows the dtype, unless the preset sets its own
    assert cfg.run.sync_check_tol == (0.01 if preset == "toy" else 0.05 if dtype == "float32" else 0.1)


@pytest.mark.parametrize("flags, native", [
    ("fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # AMD Zen 4/5, Intel Cooper Lake
    ("fpu sse avx2 avx512f amx_bf16 amx_tile", True),                  # Intel Sapphire Rapids
    ("fpu sse avx2 fma avx512f avx512bw", False),                      # AVX-512 without bf16
    ("fpu sse avx2 fma", False),
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert native_bf16(str(info)) is native
    assert native_bf16(str(tmp_path / "absent")) is False  # not Linux: float32


def test_memory_options_parse_and_offload_all_needs_zero3():
    cfg = load_config("cpu", ["policy.gradient_checkpointing=true", "reward.offload=optimizer",
                              "critic.offload=all", "critic.zero_stage=3", "critic.gradient_checkpointing=true"])
    assert cfg.policy.gradient_checkpointing and not cfg.reward.gradient_checkpointing
    assert (cfg.policy.offload, cfg.reward.offload, cfg.critic.offload) == ("none", "optimizer", "all")
    for role in ("policy", "reward", "critic"):
        with pytest.raises(ConfigError) as err:
            load_config("cpu", [f"{role}.offload=all"])
        assert f"{role}.offload=all also offloads the parameters, which needs ZeRO-3: set {role}.zero_stage=3" \
            in str(err.value)
    with pytest.raises(ConfigError, match=r"policy.offload='cpu' is not allowed; choose one of \['none', 'optimizer'"):
        load_config("cpu", ["policy.offload=cpu"])
    with pytest.raises(ConfigError, match="reward.gradient_checkpointing='maybe' must be true or false"):
        load_config("cpu", ["reward.gradient_checkpointing=maybe"])


def test_grpo_keeps_its_kl_in_the_loss_and_renamed_keys_still_load():
    """seeds/004 Protocol 8: GRPO's KL to pi_ref is a loss term (k3), not folded into the reward before the
    group normalisation; policy.kl=reward keeps the folding. Old names (a resumed run's config.yaml) load."""
    assert not load_config("cpu", ["policy.algo=grpo"]).policy.kl_in_reward()
    assert load_config("cpu", ["policy.algo=grpo", "policy.kl=reward"]).policy.kl_in_reward()
    assert load_config("cpu", ["policy.algo=rloo"]).policy.kl_in_reward()
    assert not load_config("cpu", ["policy.algo=rloo", "policy.kl=loss"]).policy.kl_in_reward()
    old = load_config("cpu", ["policy.kl_in_reward=false", "policy.rpo_alpha=0.5"])
    assert old.policy.kl == "loss" and old.policy.chosen_nll_weight == 0.5


def test_best_of_n_side_by_side_choices_name_other_data_choices():
    assert load_config("cpu", ["bon.compare_choices=init_demo,sft_demo"]).bon.compare_choices == ["init_demo",
                                                                                                  "sft_demo"]
    for bad in ("init_sft", "init_demo,init_demo", "demo_sft"):
        with pytest.raises(ConfigError, match=r"bon.compare_choices=.* must name other data choices than "
                                              r"bon.data_choice \(init_sft\)"):
            load_config("cpu", [f"bon.compare_choices={bad}"])
