"""RoboVLMs / Mobile-VLA JSON configs imported with RoboVLMs' meaning, and initial weights."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.cli import main
from mobile_vla.config import load_config
from mobile_vla.data.normalization import ActionStats, Normalizer
from mobile_vla.errors import ConfigError
from mobile_vla.robovlms import deep_update, load_robovlms
from mobile_vla.training.checkpoint import CheckpointError, load_init_weights

from .conftest import TINY_BUILTIN, tiny_overrides

DATA = Path(__file__).parent / "data" / "robovlms"
CALVIN = DATA / "calvin_base.json"  # the shape of RoboVLMs' CALVIN fine-tuning configs
CLASSES = DATA / "mobile_left_classes.json"  # the Mobile-VLA project's classification config


def _keys(obj: dict, prefix: str = "") -> list[str]:
    """Every key of a RoboVLMs config as the summary names it (sections one level deep)."""
    out = []
    for key, value in obj.items():
        if key in ("parent", "__override__"):
            continue
        name = f"{prefix}{key}"
        nested = ("train_setup", "act_head", "vlm", "trainer", "train_dataset", "val_dataset")
        if isinstance(value, dict) and not prefix and key in nested:
            out += _keys(value, f"{key}.")
        else:
            out.append(name)
    return out


def test_calvin_config_trains_what_robovlms_would(caplog) -> None:
    cfg = load_config(CALVIN)
    ts, t = cfg.train_setup, cfg.trainer
    # one AdamW group at learning_rate for everything that trains
    assert ts.learning_rate == ts.lora_lr == ts.backbone_lr == ts.action_token_lr == 2e-5
    assert ts.strategy == "full" and ts.train_vision and ts.train_text_embedding
    assert t.lr_schedule == "constant" and t.warmup_epochs == 0.25  # RoboVLMs' default schedule
    assert cfg.head.type == "lstm" and cfg.head.num_layers == 4  # LSTMDecoder's default
    assert cfg.data.window_size == 8 and cfg.data.fwd_pred_next_n == 10  # top level wins
    assert cfg.data.normalization == "bounds" and (cfg.data.norm_min, cfg.data.norm_max) == (
        -0.65,
        0.65,
    )
    assert cfg.data.augment.shift_pixels == 10  # rgb_pad
    assert cfg.backbone.name == "paligemma" and t.precision == "bf16-mixed"
    # action_dim 7 (arm + gripper) on a mobile base: the velocities, and the override works
    assert cfg.data.action_dims == ["linear_x", "linear_y", "angular_z"]
    two = load_config(CALVIN, ["--data.action_dims=[linear_x,linear_y]"])
    assert two.data.action_dims == ["linear_x", "linear_y"]
    summary = load_robovlms(CALVIN).summary()
    for key in _keys(json.loads(CALVIN.read_text())):
        assert key in summary, key  # mapped or reported with a reason, never dropped
    assert "act_head.window_size=1 replaced by the top-level window_size=8" in summary


def test_parent_is_merged_like_robovlms_and_found_beside_the_child(tmp_path) -> None:
    # the child names its parent by an absolute path of another machine
    cfg = load_config(CLASSES)
    imported = load_robovlms(CLASSES)
    assert any("used " in n and "calvin_base.json" in n for n in imported.notes)
    # the parent's keys the child does not give are inherited ...
    assert cfg.trainer.warmup_steps == 0 and cfg.data.augment.shift_pixels == 10
    assert cfg.train_setup.lora_alpha == 16
    # ... the child's win, and "__override__" replaces a whole section
    assert cfg.data.fwd_pred_next_n == 5 and cfg.data.normalization == "none"
    assert deep_update({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}
    assert deep_update({"a": {"x": 1}}, {"a": {"__override__": True, "y": 3}}) == {"a": {"y": 3}}
    # relative to the child
    (tmp_path / "sub").mkdir()
    shutil.copy(CALVIN, tmp_path / "sub" / "base.json")
    child = {**json.loads(CLASSES.read_text()), "parent": "sub/base.json"}
    (tmp_path / "child.json").write_text(json.dumps(child))
    assert load_config(tmp_path / "child.json").trainer.warmup_steps == 0
    child["parent"] = "/nowhere/missing.json"
    (tmp_path / "child.json").write_text(json.dumps(child))
    with pytest.raises(ConfigError, match=r"parent '/nowhere/missing\.json' was not found"):
        load_config(tmp_path / "child.json")


def test_mobile_vla_classification_config() -> None:
    cfg = load_config(CLASSES)
    head = cfg.head
    assert head.action_space == "classes" and head.type == "lstm" and head.num_layers == 4
    assert head.action_set[0] == [1.15, 0.0] and head.action_set[5] == [0.0, 0.0]  # Forward, Stop
    assert head.class_weights == [1.0, 0.5, 2.0, 2.0, 1.0, 1.0]
    assert cfg.data.pattern == "*left*.h5"  # a left-only config trains on left episodes only
    assert cfg.data.val_fraction == pytest.approx(0.2) and cfg.data.test_fraction == 0.0
    assert cfg.train_setup.strategy == "frozen" and cfg.backbone.name == "kosmos2"
    assert cfg.train_setup.init_checkpoint.endswith("kosmos_ph_google-robot-post-train.pt")
    assert cfg.trainer.run_name == "basket_left_classification"
    summary = load_robovlms(CLASSES).summary()
    merged = json.loads(CALVIN.read_text()) | json.loads(CLASSES.read_text())
    for key in _keys(merged):
        assert key in summary, key


def test_nine_classes_take_the_order_mobile_vla_executes(tmp_path) -> None:
    """The 9-class decoder with class weights (the shape of the Mobile-VLA project's weighted
    classification configs): the action set is its inference server's order, so each weight
    lands on the class it was written for."""
    shutil.copy(CALVIN, tmp_path / "calvin_base.json")  # the parent, found beside the child
    obj = json.loads(CLASSES.read_text())
    weights = [2.0, 0.2, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    obj["act_head"] = {**obj["act_head"], "num_classes": 9, "class_weights": weights}
    (tmp_path / "nine.json").write_text(json.dumps(obj))
    head = load_config(tmp_path / "nine.json").head
    assert head.action_space == "classes" and head.class_weights == weights
    stop, forward, backward, left, right, fl, fr, bl, br = head.action_set
    assert stop == [0.0, 0.0] and forward == [1.15, 0.0] and backward == [-1.15, 0.0]
    assert left == [0.0, 1.15] and right == [0.0, -1.15]  # +linear_y is left (REP 103)
    assert fl == [1.15, 1.15] and fr == [1.15, -1.15] and bl == [-1.15, 1.15]
    assert br == [-1.15, -1.15]
    obj["act_head"]["class_weights"] = weights[:8]
    (tmp_path / "nine.json").write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match="class_weights has 8 entries, expected 9"):
        load_config(tmp_path / "nine.json")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"act_head": {"type": "ROS2PolicyHead"}}, "act_head.type 'ROS2PolicyHead' has no"),
        (
            {"use_vision_resampler": True, "vision_resampler": {"depth": 0}},
            r"vision_resampler\.depth must be an integer >= 1",
        ),
        ({"use_hand_rgb": True}, "hand camera"),
        ({"scheduler": "step"}, "scheduler 'step'"),
        ({"act_head": {"type": "MobileVLAClassificationDecoder", "num_classes": 4}}, "6 or 9"),
        ({"train_setup": {"predict_action": False}}, "predict_action: false"),
        ({"warmup_ratio": 0.1}, "warmup_ratio 0.1"),
    ],
)
def test_settings_that_cannot_train_here_are_refused_in_one_sentence(tmp_path, change, words):
    obj = deep_update(json.loads(CALVIN.read_text()), change)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_bounds_normalization_clips_and_scales() -> None:
    stats = ActionStats.from_arrays(["a", "b"], [np.array([[0.0, 5.0], [1.0, -5.0]])])
    norm = Normalizer(stats, "bounds", (-0.5, 0.5))
    out = norm.normalize(np.array([[0.25, 3.0], [-0.5, -0.1]]))
    np.testing.assert_allclose(out, [[0.5, 1.0], [-1.0, -0.2]], atol=1e-6)
    np.testing.assert_allclose(norm.denormalize(out)[1], [-0.5, -0.1], atol=1e-6)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def _tiny_policy(seed: int, *extra: str):
    from mobile_vla.training.runs import build_policy

    over = [*TINY_BUILTIN, "head.hidden_size=16", "head.num_layers=1", f"seed={seed}", *extra]
    cfg = load_config(None, over)
    stats = ActionStats.from_arrays(["linear_x", "linear_y"], [np.zeros((4, 2))])
    return build_policy(cfg, stats)[0]


def test_init_checkpoint_loads_tensors_by_name_and_never_unpickles(tmp_path) -> None:
    source, target = _tiny_policy(1), _tiny_policy(2)
    # a RoboVLMs-style Lightning file: {"state_dict": {"model.<name>": tensor}}
    pt = tmp_path / "robovlms.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, pt)
    message = load_init_weights(target, pt)
    assert "initialised" in message
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Boom()}))
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        load_init_weights(target, evil)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match="none of its tensors matches"):
        load_init_weights(target, other)
    bad = tmp_path / "nan.pt"
    state = {k: v.clone() for k, v in source.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = float("nan")
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="not finite"):
        load_init_weights(target, bad)


def test_init_checkpoint_from_a_lora_run_loads_every_tensor(tmp_path) -> None:
    """A LoRA run's checkpoint names the wrapped layers ``...base_layer.weight``, as the policy
    that loads it does: every tensor is matched (DAgger's round goes on from such a run)."""
    lora = ("train_setup.strategy=lora", "train_setup.lora_r=4")
    source, target = _tiny_policy(1, *lora), _tiny_policy(2, *lora)
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn_like(value))  # every tensor differs, base layers too
    assert any(".base_layer." in k for k in source.state_dict())
    pt = tmp_path / "lora.pt"
    torch.save(source.state_dict(), pt)
    message = load_init_weights(target, pt)
    assert "match no name" not in message, message
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_the_classification_json_trains(tmp_path, sim_dataset, caplog) -> None:
    """``train CONFIG.json`` on left episodes with the classes head, class weights, a constant
    schedule and initial weights from a .pt: the JSON's training, on the tiny built-in
    backbone instead of Kosmos-2."""
    source = _tiny_policy(3)
    pt = tmp_path / "init.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, pt)
    over = [
        *tiny_overrides(sim_dataset, tmp_path),
        "backbone.name=builtin",
        f"train_setup.init_checkpoint={pt}",
        "trainer.max_steps=3",
        "trainer.max_epochs=1",
        "trainer.batch_size=4",
        "trainer.accumulate_grad_batches=1",
        "trainer.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "trainer.run_name=cls",
        "data.window_size=3",
        "data.val_fraction=0.25",
    ]
    over = [o for o in over if not o.startswith(("head.hidden_size", "head.num_layers"))]
    over += ["head.hidden_size=16", "head.num_layers=1"]
    with caplog.at_level("INFO"):
        assert main(["train", str(CLASSES), *[f"--{o}" for o in over], "-q"]) == 0
    run = tmp_path / "runs" / "cls"
    saved = load_config(run / "config.yaml")
    assert saved.head.action_space == "classes" and saved.trainer.lr_schedule == "constant"
    assert saved.data.pattern == "*left*.h5"
    split = json.loads((run / "split.json").read_text())
    names = [n for part in split.values() if isinstance(part, list) for n in part]
    assert names and all("_left_" in n for n in names)
    assert "initialised" in caplog.text


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("llava", "llava"),
        ("SmolVLM", "idefics3"),
        ("qwen2-vl", "qwen2_vl"),
        ("qwen2.5_vl", "qwen2_5_vl"),
    ],
)
def test_robovlms_family_names_map_to_the_adapters(name, family, tiny_vlms, tmp_path) -> None:
    from mobile_vla.models.policy import VLAPolicy

    path = tiny_vlms[family]
    for block in (
        {"vlm": {"name": name, "pretrained_model_name_or_path": str(path)}},
        {"model": name, "model_path": str(path)},
    ):
        conf = tmp_path / "c.json"
        conf.write_text(json.dumps({**block, "train_setup": {}, "window_size": 2}))
        cfg = load_config(conf, [f"data.path={tmp_path}"])
        assert (cfg.backbone.name, cfg.backbone.path) == (family, str(path))
    stats = ActionStats.from_arrays(["linear_x", "linear_y"], [np.zeros((4, 2))])
    policy = VLAPolicy(cfg, stats)  # the family's transformers class, loaded from the folder
    assert policy.backbone.name == family


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("qwen", r"Qwen-VL \(v1"),
        ("flamingo", "OpenFlamingo"),
        ("moondream", "remote code"),
        ("uform", "UForm"),
        ("blip", "no adapter of that family"),
    ],
)
def test_robovlms_families_not_built_are_refused_by_name(name, words, tmp_path) -> None:
    for block in ({"vlm": {"name": name}}, {"model": name}):
        conf = tmp_path / "c.json"
        conf.write_text(json.dumps({**block, "train_setup": {}}))
        with pytest.raises(ConfigError, match=words) as err:
            load_config(conf)
        assert repr(name) in str(err.value) and "llava" in str(err.value)


def test_vision_resampler_is_built_in_the_robovlms_shape(tmp_path) -> None:
    obj = deep_update(
        json.loads(CALVIN.read_text()),
        {
            "use_vision_resampler": True,
            "vision_resampler": {
                "vis_dim": 1024,
                "depth": 8,
                "dim_head": 64,
                "heads": 8,
                "num_latents": 64,
            },
        },
    )
    path = tmp_path / "c.json"
    path.write_text(json.dumps(obj))
    r = load_config(path).backbone.resampler
    assert (r.enabled, r.depth, r.dim_head, r.heads, r.num_latents) == (True, 8, 64, 8, 64)
    summary = load_robovlms(path).summary()
    assert "vision_resampler.vis_dim (the resampler reads the projected image tokens" in summary
    obj["vlm"]["name"] = "qwen2_vl"
    path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match=r"backbone\.resampler\.enabled' must be false"):
        load_config(path)
