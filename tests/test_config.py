from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mobile_vla.config import Config, load_config, save_config, to_dict
from mobile_vla.errors import ConfigError


def write(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.action_indices == [0, 1]


def test_parent_inheritance_child_wins(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", {"seed": 3, "data": {"window_size": 4, "fwd_pred_next_n": 5}})
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path / "sub" / "child.yaml", {"parent": "../base.yaml", "data": {"window_size": 6}}
    )
    cfg = load_config(child)
    assert (cfg.seed, cfg.data.window_size, cfg.data.fwd_pred_next_n) == (3, 6, 5)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "--data.window_size=3",
            "seed=9",
            "data.action_dims=[linear_y]",
            "--sim.teleop_actions=false",
            "--data.augment.mirror_prob=0.5",
        ],
    )
    assert cfg.data.window_size == 3 and cfg.seed == 9
    assert cfg.data.action_dims == ["linear_y"] and cfg.data.action_indices == [1]
    assert cfg.sim.teleop_actions is False and cfg.data.augment.mirror_prob == 0.5


def test_unknown_key_in_file_names_file_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {"data": {"windw_size": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "data.windw_size" in msg and "data.window_size" in msg and "c.yaml" in msg


def test_unknown_override_suggests() -> None:
    with pytest.raises(ConfigError, match=r"'sim\.sped'.*did you mean 'sim\.speed'"):
        load_config(None, ["--sim.sped=2"])
    with pytest.raises(ConfigError, match="not known"):
        load_config(None, ["--nonsense=1"])


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"'data\.window_size' must be an integer"):
        load_config(None, ["--data.window_size=abc"])
    with pytest.raises(ConfigError, match=r"'data\.normalization' must be one of"):
        load_config(None, ["--data.normalization=zscore"])
    with pytest.raises(ConfigError, match=r"'sim\.teleop_actions' must be true or false"):
        load_config(None, ["--sim.teleop_actions=3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.window_size=0", "data.window_size"),
        ("data.action_dims=[linear_z]", "data.action_dims"),
        ("data.image_size=[4, 4]", "data.image_size"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.channel_order=grb", "data.channel_order"),
        ("data.test_fraction=0.95", "data.test_fraction"),
        ("data.instruction_template='go there'", "data.instruction_template"),
        ("data.augment.mirror_prob=2", "data.augment.mirror_prob"),
        ("sim.physics_timestep=0.03", "sim.physics_timestep"),
        ("sim.targets=[car]", "sim.targets"),
        ("sim.max_steps=0", "sim.max_steps"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_dropout_that_would_do_nothing_is_refused() -> None:
    """PyTorch's LSTM applies dropout between layers: on a 1-layer LSTM head it is a no-op."""
    with pytest.raises(ConfigError, match=r"'head\.dropout'.*1-layer LSTM"):
        load_config(None, ["head.num_layers=1", "head.dropout=0.3"])
    assert load_config(None, ["head.num_layers=2", "head.dropout=0.3"]).head.dropout == 0.3
    assert load_config(None, ["head.type=mlp", "head.num_layers=1", "head.dropout=0.3"])


def test_parent_cycle_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"parent": "b.yaml"})
    write(tmp_path / "b.yaml", {"parent": "a.yaml"})
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["--seed=4", "--data.window_size=2", "--sim.image_size=[32, 48]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_repository_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ has no YAML files"
    from mobile_vla.pretraining.config import PretrainConfig
    from mobile_vla.study.grid import load_study

    kinds = {
        "pretrain.yaml": "pretrain",
        "study_quick.yaml": "study",
        "study_full.yaml": "study",
        "study_pretraining.yaml": "study",
        "study_case34.yaml": "study",
    }
    for path in files:
        kind = kinds.get(path.name, "policy")
        if kind == "pretrain":
            load_config(path, cls=PretrainConfig)
        elif kind == "study":
            load_study(path)
        else:
            load_config(path)
    assert set(kinds) <= {p.name for p in files}


def test_base_yaml_spells_out_every_default() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    raw = yaml.safe_load((root / "base.yaml").read_text())
    assert to_dict(load_config(root / "base.yaml")) == to_dict(Config())
    assert set(raw) == set(to_dict(Config()))  # every section written out


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-4` as a string; a float key takes it as the number it spells, in a
    file and on the command line, and a word is still refused by name."""
    path = tmp_path / "c.yaml"
    path.write_text("train_setup:\n  learning_rate: 3e-4\n")
    cfg = load_config(path, ["--train_setup.backbone_lr=1e-4", "train_setup.lora_lr=2E+1"])
    assert cfg.train_setup.learning_rate == 3e-4 and cfg.train_setup.backbone_lr == 1e-4
    assert cfg.train_setup.lora_lr == 20.0
    with pytest.raises(ConfigError, match=r"'train_setup\.backbone_lr' must be a number"):
        load_config(None, ["--train_setup.backbone_lr=1e-4x"])
