"""Config: presets parse, overrides coerce, every field is documented, errors name the key and choices."""

import dataclasses

import pytest

from afd_ray.config import Config, ConfigError, describe, field_docs, load_config, presets


def test_presets_load():
    assert {"cpu", "ultrachat-2gpu", "ultrachat-8gpu", "hh-harmless", "hh-helpful", "tldr-ppo", "toy"} <= set(presets())
    for name in presets():
        load_config(name)  # every preset validates
    cpu = load_config("cpu")
    assert cpu.model.policy == "smollm2-offline" and cpu.data.demonstrations == "offline:chatterbot"
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
