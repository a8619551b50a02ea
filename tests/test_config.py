"""Config: dataclass defaults, YAML and key=value overrides, type parsing, validation, run dirs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rayalign.config import Config, ConfigError, LossConfig
from rayalign.config_loader import (
    config_to_dict,
    dump_config,
    load_config,
    valid_keys,
)
from rayalign.run_dir import prepare_run_dir

REPO = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_dataclasses():
    config = load_config()
    assert config == Config()
    assert config.loss.beta == 0.1 and config.loss.type == "dpo"
    assert config.spa.mix_schedule == (1.5, 1.25, 1.125)  # mix = 1 + lambda, ALGORITHMS.md §5
    assert config.model.trust_remote_code is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.beta = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("loss.beta=0.05", ("loss", "beta"), 0.05),
        ("optim.lr=1e-6", ("optim", "lr"), 1e-6),
        ("train.num_workers=2", ("train", "num_workers"), 2),
        ("train.use_gpu=true", ("train", "use_gpu"), True),
        ("train.padding_free=False", ("train", "padding_free"), False),
        ("loss.type=ipo", ("loss", "type"), "ipo"),
        ("spa.mix_schedule=[1.5, 1.2]", ("spa", "mix_schedule"), (1.5, 1.2)),
        ("spa.mix_schedule=1.5,1.1,1.05", ("spa", "mix_schedule"), (1.5, 1.1, 1.05)),
        ("train.max_steps=7", ("train", "max_steps"), 7),
        ("train.max_steps=null", ("train", "max_steps"), None),
        ("data.eval_file=none", ("data", "eval_file"), None),
        ("loss.label_smoothing=0.1", ("loss", "label_smoothing"), 0.1),
        ("loss.mallows_scale=auto", ("loss", "mallows_scale"), "auto"),
        ("loss.mallows_scale=0.5", ("loss", "mallows_scale"), 0.5),
        ("loss.mallows_phi=0.05", ("loss", "mallows_phi"), 0.05),
        ("tune.space={optim.lr: {grid: [1.0e-6, 5.0e-7]}}", ("tune", "space"), {"optim.lr": {"grid": [1e-6, 5e-7]}}),
    ],
)
def test_override_is_parsed_by_the_field_type(override, key, expected):
    config = load_config(None, [override])
    value = getattr(getattr(config, key[0]), key[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.bta=0.1", "loss.bta: unknown config key; did you mean loss.beta?"),
        ("los.beta=0.1", "did you mean loss.beta?"),
        ("train.num_worker=2", "did you mean train.num_workers?"),
        ("loss.beta=0", "loss.beta: must be > 0"),
        ("loss.beta=-1", "loss.beta: must be > 0"),
        ("loss.type=dpoo", "loss.type: must be one of"),
        ("loss.type=mallow_theta", "did you mean mallows_theta?"),
        ("train.use_gpu=maybe", "train.use_gpu: expected bool"),
        ("train.num_workers=two", "train.num_workers: expected int"),
        ("train.num_workers=1.5", "train.num_workers: expected int"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("spa.mix_schedule=[0.5, 0.25]", "spa.mix_schedule: entries are mix = 1 + lambda"),
        ("loss.mallows_scale=sometimes", "loss.mallows_scale: must be a number > 0 or 'auto'"),
        ("loss.mallows_phi=1.5", "loss.mallows_phi: must be in (0, 1)"),
        ("loss.beta", "overrides are written key=value"),
    ],
)
def test_invalid_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_batch_size_must_divide_by_workers_times_accumulation():
    split = ["train.num_workers=4", "train.gradient_accumulation_steps=2"]
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 30 pairs is not divisible .* 4 x 2 = 8"):
        load_config(None, ["train.global_batch_size=30", *split])
    config = load_config(None, ["train.global_batch_size=32", *split])
    assert config.train.micro_batch_size == 4


def test_exo_pref_needs_positive_label_smoothing_and_spa_needs_dpo():
    with pytest.raises(ConfigError, match="loss.label_smoothing: must be in \\(0, 0.5\\)"):
        LossConfig(type="exo_pref", label_smoothing=0.0)
    with pytest.raises(ConfigError, match="spa.refine: applies on top of loss.type=dpo"):
        load_config(None, ["spa.refine=true", "loss.type=ipo"])
    with pytest.raises(ConfigError, match="optim.warmup_steps: set either"):
        load_config(None, ["optim.warmup_steps=10", "optim.warmup_ratio=0.1"])


def test_offloading_needs_persistent_hosts_and_a_gpu_fraction_one_worker():
    with pytest.raises(ConfigError, match=r"generate.offload_between_passes: needs generate.persistent=true"):
        load_config(None, ["generate.offload_between_passes=true"])
    with pytest.raises(ConfigError, match=r"judge.offload_between_passes: needs judge.persistent=true"):
        load_config(None, ["judge.offload_between_passes=true"])
    with pytest.raises(ConfigError, match=r"train.gpus_per_worker: is read only with train.use_gpu=true"):
        load_config(None, ["train.gpus_per_worker=0.5"])
    with pytest.raises(ConfigError, match=r"train.gpus_per_worker: a fraction \(0.5\) needs train.num_workers=1"):
        load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.5", "train.num_workers=2"])
    for key in ("train.gpus_per_worker", "generate.gpus_per_actor", "ref.gpus_per_actor"):  # Ray refuses 1.5
        with pytest.raises(ConfigError, match=rf"{key}: must be a fraction of one GPU or a whole number; got 1.5"):
            load_config(None, ["train.use_gpu=true", f"{key}=1.5"])
    config = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.5", "generate.persistent=true",
                                "generate.offload_between_passes=true"])
    assert config.train.gpus_per_worker == 0.5 and config.generate.offload_between_passes


def test_yaml_overrides_and_cli_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  beta: 0.2\n  type: ipo\noptim:\n  lr: 1e-6\n")  # YAML 1.1 reads 1e-6 as a string
    config = load_config(path, ["loss.beta=0.3"])
    assert (config.loss.type, config.loss.beta, config.optim.lr) == ("ipo", 0.3, 1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loss:\n  bta: 0.2\n", "loss.bta: unknown config key; did you mean loss.beta?"),
        ("losses:\n  beta: 0.2\n", "did you mean loss.beta?"),
        ("loss: 3\n", "loss: expected a mapping"),
        ("- a\n- b\n", "a config file is a mapping of sections"),
        ("loss:\n  beta: [1\n", "invalid YAML"),
        ("train:\n  use_gpu: 1\n", "train.use_gpu: expected bool"),
        ("loss:\n  type: 3\n", "loss.type: expected str"),
    ],
)
def test_bad_yaml_files_fail_clearly(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_yaml_is_read_with_safe_load(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("loss:\n  type: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["loss.type=mallows_theta", "spa.mix_schedule=[1.5,1.25]", "train.max_steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert yaml.safe_load(dump_config(config)) == config_to_dict(config)


def test_every_key_is_listed_and_every_shipped_config_loads():
    keys = valid_keys()
    assert "loss.beta" in keys and "run.dir" in keys and "sams.ratio" in keys
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert shipped, "configs/ has no YAML files"
    for path in shipped:
        assert isinstance(load_config(path), Config), path


def test_prepare_run_dir_writes_resolved_config(tmp_path):
    explicit = prepare_run_dir(load_config(None, [f"run.dir={tmp_path / 'r1'}", "loss.beta=0.2"]))
    assert Path(explicit.run.dir) == tmp_path / "r1"
    assert load_config(tmp_path / "r1" / "config.yaml") == explicit
    fresh = prepare_run_dir(load_config(), root=tmp_path / "runs")
    run_dir = Path(fresh.run.dir)
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").run.dir == fresh.run.dir
    assert not list(run_dir.glob(".*tmp*")), "a temporary file was left behind"
