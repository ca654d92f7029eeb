"""The run configuration: presets load, overrides apply with YAML types, bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.presets import (
    apply_overrides,
    load_config,
    parse_override,
    presets,
    validate_config,
)
from pipeline.config.schema import ConfigError, RunConfig

PRESETS = ("demo", "fashion-mnist-resnet18", "cifar10-resnet18", "cifar10-resnet34")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.removal.enabled and cfg.shrinkage.enabled


def test_presets_are_sized_as_documented() -> None:
    demo, fashion = load_config("demo"), load_config("fashion-mnist-resnet18")
    gpu18, gpu34 = load_config("cifar10-resnet18"), load_config("cifar10-resnet34")
    assert set(PRESETS) <= set(presets())
    assert (demo.data.name, demo.teacher.arch) == ("digits", "small_cnn")
    assert (fashion.data.name, fashion.teacher.arch) == ("fashion-mnist", "resnet18")
    assert (gpu18.teacher.arch, gpu34.teacher.arch) == ("resnet18", "resnet34")
    assert demo.ray.gpus_per_child == fashion.ray.gpus_per_child == 0
    assert gpu18.ray.gpus_per_child > 0
    # The GPU presets evaluate the most children (N2N's budget); the Fashion-MNIST preset is
    # sized to an hour on 2 cores: 5 removable blocks (32 masks) need few removal children,
    # and hopeless children stop early, scored on a validation subset.
    assert fashion.removal.episodes < demo.removal.episodes < gpu18.removal.episodes
    assert fashion.distill.early_stop and fashion.distill.val_subset == 2000
    assert not demo.distill.early_stop and fashion.finetune.top_k == 2


def test_defaults_fill_what_a_preset_leaves_out() -> None:
    cfg = load_config("demo")
    assert cfg.tracking.uri == "sqlite:///mlflow.db" and cfg.tracking.enabled
    assert cfg.search.evaluator == "pipeline.children.evaluator:KDEvaluator"
    assert cfg.shrinkage.ratios == [0.125, 0.25, 0.375, 0.5, 0.75, 1.0]


def test_overrides_parse_values_as_yaml() -> None:
    cfg = load_config(
        "demo",
        [
            "removal.iterations=3",
            "shrinkage.ratios=[1.0, 0.5]",
            "tracking.enabled=false",
            "search.algo=appo",
            "ray.address=auto",
            "reward.budgets={flops: 0.5}",
        ],
    )
    assert cfg.removal.iterations == 3 and isinstance(cfg.removal.iterations, int)
    assert cfg.shrinkage.ratios == [0.5, 1.0]  # sorted
    assert cfg.tracking.enabled is False
    assert cfg.search.algo == "appo"
    assert cfg.ray.address == "auto"
    assert cfg.reward.budgets == {"flops": 0.5}
    assert cfg.removal.episodes == 3 * cfg.removal.episodes_per_iteration


def test_apply_overrides_leaves_the_input_alone() -> None:
    raw = {"removal": {"iterations": 2}}
    out = apply_overrides(raw, ["removal.iterations=5", "shrinkage.enabled=false"])
    assert raw == {"removal": {"iterations": 2}}
    assert out == {"removal": {"iterations": 5}, "shrinkage": {"enabled": False}}
    assert parse_override("a.b.c= [1, 2]") == (["a", "b", "c"], [1, 2])


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["removal.iterations=0"], "'removal.iterations'"),
        (["removal.iteratoins=3"], "'removal.iteratoins' is unknown"),
        (["bogus.key=1"], "'bogus' is unknown"),
        (["search.algo=a3c"], "'search.algo'"),
        (["search.policy=transformer"], "'search.policy'"),
        (["distill.steps=ten"], "'distill.steps'"),
        (["shrinkage.ratios=[0.5, 1.5]"], "'shrinkage.ratios.1'"),
        (["shrinkage.ratios=[0.5, 0.5, 1.0]"], "'shrinkage.ratios'"),
        (["data.val_fraction=1.0"], "'data.val_fraction'"),
        (["data.name=imagenet"], "'data.name'"),
        (["reward.budgets={energy: 0.5}"], "'reward.budgets.energy'"),
        (["ray.gpus_per_child=-1"], "'ray.gpus_per_child'"),
        (["removal=3"], "'removal'"),
        (["removal.iterations"], "removal.iterations=3"),
        (["removal.enabled=false", "shrinkage.enabled=false"], "enable at least one stage"),
    ],
)
def test_bad_values_fail_on_one_line_naming_the_key(overrides: list[str], names: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    message = str(err.value)
    assert names in message
    assert "\n" not in message


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'dmeo'.*demo"):
        load_config("dmeo")


def test_yaml_files_load_and_bad_files_are_named(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nremoval:\n  iterations: 2\n")
    assert load_config(good).removal.iterations == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("removal:\n  iterations: [2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+ is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_paths_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config("demo", [f"output.run_dir={tmp_path / 'run'}"]).resolve_paths()
    assert cfg.output.run_dir == str((tmp_path / "run").resolve())
    assert cfg.output.storage_path == str((tmp_path / "run" / "tune").resolve())
    unnamed = load_config("demo").resolve_paths(now=0)
    assert Path(unnamed.output.run_dir).parent.name == "runs"
    assert Path(unnamed.output.run_dir).name.startswith("demo-")
    remote = load_config("demo", ["output.storage_path=s3://bucket/n2n"]).resolve_paths()
    assert remote.output.storage_path == "s3://bucket/n2n"
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg


def test_every_field_is_documented() -> None:
    def walk(model: type) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, RunConfig.__mro__[1]):
                walk(annotation)
            else:
                assert info.description, f"{model.__name__}.{name} has no description"

    walk(RunConfig)
    assert validate_config({}).name == "demo"


def test_rollout_timeout_covers_every_child_a_runner_evaluates() -> None:
    cfg = load_config("demo", ["distill.timeout_s=100", "search.env_runners=2", "search.algo=appo"])
    # 5 episodes on 2 runners: 3 children in a row, each allowed the evaluator's hard timeout.
    assert cfg.rollout_timeout_s("removal") == 3 * (2 * 100 + 60)
    fixed = load_config("demo", ["search.sample_timeout_s=9999"])
    assert fixed.rollout_timeout_s("removal") == 9999
    with pytest.raises(ConfigError, match="search.sample_timeout_s=10 is shorter than distill"):
        load_config("demo", ["search.sample_timeout_s=10", "distill.timeout_s=100"])


def test_a_ppo_batch_that_cannot_split_between_env_runners_is_refused() -> None:
    # RLlib's PPO would refuse it only once Ray and Tune are up; here it is one line.
    with pytest.raises(ConfigError, match="shrinkage.episodes_per_iteration=5 is not a multiple"):
        load_config("demo", ["search.env_runners=2", "removal.episodes_per_iteration=4"])
    assert load_config("demo", ["search.env_runners=5"]).search.env_runners == 5
