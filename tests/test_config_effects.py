"""Every config key that exists has an effect: for each leaf key, two values give observably
different results (or one of them is refused). A key added without a line here fails
``test_every_key_is_covered``."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mobile_vla.config import Config, load_config
from mobile_vla.errors import MobileVLAError

from .conftest import write_real_layout


def leaf_keys(cls: type = Config, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= leaf_keys(tp, name + ".")
        else:
            keys.add(name)
    return keys


def digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(
            np.ascontiguousarray(np.asarray(a)).tobytes() if not isinstance(a, str) else a.encode()
        )
        h.update(b"|")
    return h.hexdigest()


# ---- observables -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_env(sim_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    real = tmp_path_factory.mktemp("real")
    write_real_layout(
        real / "episode_20251106_141502_1box_left_core_medium.h5", height=36, width=64
    )
    write_real_layout(real / "episode_20251106_141503_1box_right_core_far.h5", height=36, width=64)
    bad = tmp_path_factory.mktemp("withbad")
    for p in sorted(sim_dataset.glob("episode_*.h5"))[:6]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "episode_20260101_000000_1box_left_broken.h5").write_bytes(b"not hdf5")
    return {"sim": sim_dataset, "real": real, "bad": bad, "cache": tmp_path_factory.mktemp("c")}


def data_observable(env: dict[str, Path], overrides: list[str]) -> str:
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.data.frame_cache import FrameCache

    base = [
        f"data.path={env['sim']}",
        f"data.cache_dir={env['cache']}",
        "data.image_size=[24, 32]",
        "data.val_fraction=0.25",
    ]
    cfg = load_config(None, base + overrides)
    try:
        bundle = build_datasets(cfg)
    except MobileVLAError as exc:
        return f"error: {type(exc).__name__}"
    parts: list[Any] = [
        str(len(bundle.train)),
        str(len(bundle.val)),
        ",".join(e.path.name for e in bundle.split.val),
        type(bundle.train.frames).__name__,
    ]
    if isinstance(bundle.train.frames, FrameCache):
        parts.append(str(bundle.train.frames.root))
    for ds in (bundle.train, bundle.val):
        for i in range(0, len(ds), max(1, len(ds) // 7)):
            s = ds[i]
            parts += [
                s["images"].numpy(),
                s["obs_mask"].numpy(),
                s["actions"].numpy(),
                s["action_mask"].numpy(),
                s["instruction"],
            ]
    return digest(*parts)


def sim_observable(overrides: list[str]) -> str:
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import run_expert
    from mobile_vla.sim.scenario import make_scenario

    cfg = load_config(None, ["sim.image_size=[24, 32]", *overrides]).sim
    env = NavEnv(cfg)
    try:
        scenario = make_scenario(5, "1box", "left", "medium", cfg)
        ep = run_expert(env, scenario)
        return digest(ep.frames, ep.actions, scenario.instruction, str(env.trajectory))
    finally:
        env.close()


DATA: dict[str, tuple[str, str]] = {
    "seed": ("seed=0", "seed=1"),
    "data.path": ("", "data.path=/nonexistent/folder"),
    "data.pattern": ("", "data.pattern=episode_*2box*.h5"),
    "data.action_names": ("", "data.action_names=[linear_y,linear_x,angular_z]"),
    "data.action_dims": ("", "data.action_dims=[linear_y]"),
    "data.window_size": ("", "data.window_size=3"),
    "data.fwd_pred_next_n": ("", "data.fwd_pred_next_n=4"),
    "data.chunk_offset": ("", "data.chunk_offset=1"),
    "data.image_size": ("", "data.image_size=[16,16]"),
    "data.val_fraction": ("", "data.val_fraction=0.5"),
    "data.channel_order": ("", "data.channel_order=bgr"),
    "data.test_fraction": ("data.val_fraction=0", "data.val_fraction=0 data.test_fraction=0.5"),
    "data.split_seed": ("", "data.split_seed=7"),
    "data.train_episodes": ("", "data.train_episodes=4"),
    "data.normalization": ("", "data.normalization=meanstd"),
    "data.norm_min": ("data.normalization=bounds", "data.normalization=bounds data.norm_min=-0.5"),
    "data.norm_max": ("data.normalization=bounds", "data.normalization=bounds data.norm_max=0.5"),
    "data.frame_cache": ("", "data.frame_cache=false"),
    "data.augment.color_jitter": ("", "data.augment.color_jitter=0.4"),
    "data.augment.shift_pixels": ("", "data.augment.shift_pixels=4"),
    "data.augment.mirror_prob": ("", "data.augment.mirror_prob=1.0"),
}
SIM: dict[str, tuple[str, str]] = {
    "sim.image_size": ("", "sim.image_size=[16,16]"),
    "sim.control_hz": ("", "sim.control_hz=5"),
    "sim.physics_timestep": ("", "sim.physics_timestep=0.02"),
    "sim.episode_length": ("", "sim.episode_length=10"),
    "sim.max_steps": ("sim.episode_length=0", "sim.episode_length=0 sim.max_steps=5"),
    "sim.teleop_actions": ("", "sim.teleop_actions=false"),
    "sim.speed": ("", "sim.speed=0.8"),
    "sim.action_noise": ("", "sim.action_noise=0.5"),
    "sim.noise_steps": ("sim.action_noise=0.3", "sim.action_noise=0.3 sim.noise_steps=4"),
    "sim.paraphrase_prob": ("sim.paraphrase_prob=0", "sim.paraphrase_prob=1"),
    "sim.targets": ("sim.targets=[bottle]", "sim.targets=[basket]"),
    "sim.yaw_jitter_deg": (
        "sim.teleop_actions=false",
        "sim.teleop_actions=false sim.yaw_jitter_deg=20",
    ),
    "sim.randomize_appearance": ("", "sim.randomize_appearance=false"),
}
# Keys whose effect needs a dataset of another kind, or is checked by a test elsewhere:
SPECIAL = {
    "data.skip_bad",
    "data.instruction_template",
    "data.cache_dir",  # below
    "trainer.num_workers",
    "train_setup.gradual_every_steps",  # below
    # layers run again in backward: test_policy.py::test_gradient_checkpointing_recomputes_layers
    "train_setup.gradient_checkpointing",
    # cached vs live: test_feature_cache.py::test_training_on_the_cache_matches_live_training
    "data.feature_cache",
    # padding skipped, every frame supervised:
    # test_policy.py::test_per_step_head_skips_padding_and_supervises_every_frame
    "head.per_step",
    # two processes, gloo: test_training.py::test_two_process_ddp_on_cpu
    "trainer.devices",
    "trainer.strategy",
    # loaded by train(): test_robovlms.py::test_init_checkpoint_loads_tensors_by_name_and_...
    "train_setup.init_checkpoint",
    # twins kept or left out: test_dataset.py::test_counterfactual_episodes_follow_their_source
    "data.counterfactual",
    # the read-out's loss is logged and trained:
    # test_training.py::test_instruction_aux_trains_beside_the_policy_and_stays_out_of_it
    "train_setup.instruction_aux_weight",
    # twin beside source in the epoch's order:
    # test_training.py::test_counterfactual_pairs_keep_each_twin_beside_its_source
    "trainer.counterfactual_pairs",
    # the same function either way, by design; which forward runs:
    # test_lora_fused.py::test_the_key_decides_which_forward_runs
    "train_setup.lora_fused",
    # the training loss weighted where the command changes, validation unweighted:
    # test_policy.py::test_change_weight_weighs_the_frames_where_the_command_changes
    "head.change_weight",
}


def test_every_key_is_covered() -> None:
    assert leaf_keys() == set(DATA) | set(SIM) | set(MODEL) | set(TRAINER) | SPECIAL


@pytest.mark.parametrize("key", sorted(DATA))
def test_data_key_has_effect(key: str, data_env: dict[str, Path]) -> None:
    a, b = DATA[key]
    assert data_observable(data_env, a.split()) != data_observable(data_env, b.split())


@pytest.mark.parametrize("key", sorted(SIM))
def test_sim_key_has_effect(key: str) -> None:
    a, b = SIM[key]
    assert sim_observable(a.split()) != sim_observable(b.split())


def test_skip_bad_has_effect(data_env: dict[str, Path]) -> None:
    bad = f"data.path={data_env['bad']}"
    assert data_observable(data_env, [bad]) == "error: DataError"
    assert not data_observable(data_env, [bad, "data.skip_bad=true"]).startswith("error")


def test_instruction_template_has_effect(data_env: dict[str, Path]) -> None:
    real = f"data.path={data_env['real']}"
    a = data_observable(data_env, [real])
    b = data_observable(
        data_env, [real, "data.instruction_template='Go to the basket on the {side}'"]
    )
    assert a != b


def test_cache_dir_has_effect(data_env: dict[str, Path], tmp_path: Path) -> None:
    elsewhere = f"data.cache_dir={tmp_path / 'elsewhere'}"
    assert data_observable(data_env, []) != data_observable(data_env, [elsewhere])
    assert any((tmp_path / "elsewhere" / "frames").rglob("*.npy"))


# ---- model, strategy and trainer keys --------------------------------------------------------

STATS = None


def model_observable(overrides: list[str], data: Path, tmp: Path) -> str:
    """Build the policy, apply the strategy, take two AdamW steps on a fixed batch."""
    import torch

    from mobile_vla.data.normalization import ActionStats
    from mobile_vla.training.runs import build_policy

    from .conftest import tiny_overrides

    try:
        cfg = load_config(None, [*tiny_overrides(data, tmp), *overrides])
        names = cfg.data.action_dims
        stats = ActionStats.from_arrays(
            names, [np.random.default_rng(0).uniform(-1.15, 1.15, (40, len(names)))]
        )
        policy, plan = build_policy(cfg, stats)
    except MobileVLAError as exc:
        return f"error: {type(exc).__name__}"
    g = torch.Generator().manual_seed(0)
    w, n = cfg.data.window_size, cfg.data.fwd_pred_next_n
    batch = {
        "images": torch.randint(0, 256, (2, w, 3, 32, 32), dtype=torch.uint8, generator=g),
        "instruction": ["go around the box on the left", "pass it on the right"],
        "obs_mask": torch.ones(2, w, dtype=torch.bool),
        "actions": torch.rand(2, n, len(names), generator=g) * 2 - 1,
        "action_mask": torch.ones(2, n, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(plan.param_groups, weight_decay=cfg.trainer.weight_decay)
    torch.manual_seed(0)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss, out = policy.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.detach().numpy())
    groups = ",".join(
        f"{grp['name']}:{grp['lr']}:{len(grp['params'])}" for grp in plan.param_groups
    )
    trainable = ",".join(n for n, p in policy.named_parameters() if p.requires_grad)
    physical = policy.to_physical(policy.decode(out))
    return digest(
        *losses, out.logits.detach().numpy(), physical, groups, trainable, str(plan.table)
    )


def trainer_observable(overrides: list[str], data: Path, tmp: Path) -> str:
    """A short real training run; its final weights, steps, logs and folder."""
    import shutil

    from mobile_vla.training.checkpoint import load_folder
    from mobile_vla.training.run import train

    from .conftest import tiny_overrides

    shutil.rmtree(tmp / "runs", ignore_errors=True)
    try:
        cfg = load_config(
            None,
            [*tiny_overrides(data, tmp), "trainer.run_name=r", "trainer.max_steps=3", *overrides],
        )
        run = train(cfg, progress=False)
    except MobileVLAError as exc:
        return f"error: {type(exc).__name__}"
    state = load_folder(run / "checkpoints" / "last")
    csv = (run / "logs" / "csv" / "metrics.csv").read_text()
    tensors = [state["state_dict"][k].float().numpy() for k in sorted(state["state_dict"])]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    return digest(
        *tensors, str(state["global_step"]), str(state["epoch"]), str(run), csv, str(kept)
    )


def fmt(values: list[str], paths: dict[str, Path]) -> list[str]:
    out = []
    for v in values:
        for k, p in paths.items():
            v = v.replace("{" + k + "}", str(p))
        out.append(v)
    return out


LLAVA = ["backbone.name=llava", "backbone.path={llava}"]
RESAMPLER = [
    "backbone.resampler.enabled=true",
    "backbone.resampler.depth=2",
    "backbone.resampler.dim_head=8",
    "backbone.resampler.heads=2",
    "backbone.resampler.num_latents=3",
]
MODEL: dict[str, tuple[list[str], list[str]]] = {
    "backbone.name": ([], ["backbone.name=kosmos2", "backbone.path={kosmos2}"]),
    "backbone.path": (
        ["backbone.name=kosmos2", "backbone.path={kosmos2}"],
        ["backbone.name=kosmos2", "backbone.path={paligemma}"],
    ),
    "backbone.history": ([], ["backbone.history=pre"]),
    "backbone.resampler.enabled": (LLAVA, [*LLAVA, *RESAMPLER]),
    **{
        f"backbone.resampler.{k}": (
            [*LLAVA, *RESAMPLER],
            [*LLAVA, *RESAMPLER, f"backbone.resampler.{k}={v}"],
        )
        for k, v in {"depth": 1, "dim_head": 4, "heads": 4, "num_latents": 2}.items()
    },
    "backbone.n_action_tokens": ([], ["backbone.n_action_tokens=2"]),
    "backbone.prompt": ([], ["backbone.prompt=Robot, {instruction}"]),
    "backbone.builtin.image_size": ([], ["backbone.builtin.image_size=48"]),
    "backbone.builtin.patch_size": ([], ["backbone.builtin.patch_size=16"]),
    "backbone.builtin.vision_width": ([], ["backbone.builtin.vision_width=48"]),
    "backbone.builtin.vision_layers": ([], ["backbone.builtin.vision_layers=1"]),
    "backbone.builtin.vision_heads": ([], ["backbone.builtin.vision_heads=4"]),
    "backbone.builtin.fusion_width": ([], ["backbone.builtin.fusion_width=48"]),
    "backbone.builtin.fusion_layers": ([], ["backbone.builtin.fusion_layers=2"]),
    "backbone.builtin.fusion_heads": ([], ["backbone.builtin.fusion_heads=4"]),
    "backbone.builtin.text_encoder": ([], ["backbone.builtin.text_encoder=/nonexistent/enc"]),
    "backbone.builtin.max_text_tokens": ([], ["backbone.builtin.max_text_tokens=4"]),
    "backbone.pretrained": (
        ["backbone.builtin.weights={tinyweights}"],
        ["backbone.builtin.weights={tinyweights}", "backbone.pretrained=true"],
    ),
    "backbone.builtin.weights": (
        ["backbone.pretrained=true", "backbone.builtin.weights={tinyweights}"],
        ["backbone.pretrained=true", "backbone.builtin.weights={tinyweights2}"],
    ),
    "head.type": ([], ["head.type=gpt"]),
    "head.hidden_size": ([], ["head.hidden_size=16"]),
    "head.num_layers": ([], ["head.num_layers=2"]),
    "head.dropout": (["head.type=mlp"], ["head.type=mlp", "head.dropout=0.5"]),
    "head.action_space": ([], ["head.action_space=discrete"]),
    "head.loss": ([], ["head.loss=mse"]),
    "head.loss_weights": ([], ["head.loss_weights=[1.0,0.1]"]),
    "head.n_bins": (
        ["head.action_space=discrete"],
        ["head.action_space=discrete", "head.n_bins=8"],
    ),
    "head.action_set": (
        ["head.action_space=classes"],
        ["head.action_space=classes", "head.action_set=[[1.15,0],[0,1.15]]"],
    ),
    "head.gripper": ([], ["head.gripper=linear_y"]),
    "head.snap_to_keys": ([], ["head.snap_to_keys=0.5"]),
    "head.class_weights": (
        ["head.action_space=classes", "data.normalization=minmax"],
        [
            "head.action_space=classes",
            "data.normalization=minmax",
            "head.class_weights=[1,1,1,1,0.1,1,1,1,9]",
        ],
    ),
    "head.gripper_loss_ratio": (
        ["head.gripper=linear_y"],
        ["head.gripper=linear_y", "head.gripper_loss_ratio=1.0"],
    ),
    "train_setup.strategy": ([], ["train_setup.strategy=full"]),
    "train_setup.freeze_backbone": ([], ["train_setup.freeze_backbone=false"]),
    "train_setup.train_vision": ([], ["train_setup.train_vision=true"]),
    "train_setup.train_text_embedding": ([], ["train_setup.train_text_embedding=true"]),
    "train_setup.train_text_tower": ([], ["train_setup.train_text_tower=true"]),
    "train_setup.freeze_resampler": ([], ["train_setup.freeze_resampler=false"]),
    "train_setup.train_decoder_layers": ([], ["train_setup.train_decoder_layers=1"]),
    "train_setup.lora_enable": ([], ["train_setup.lora_enable=true"]),
    "train_setup.lora_r": (
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_r=4"],
    ),
    "train_setup.lora_alpha": (
        ["train_setup.strategy=lora", "train_setup.lora_lr=0.01"],
        ["train_setup.strategy=lora", "train_setup.lora_lr=0.01", "train_setup.lora_alpha=64"],
    ),
    "train_setup.lora_dropout": (
        ["train_setup.strategy=lora", "train_setup.lora_lr=0.01"],
        ["train_setup.strategy=lora", "train_setup.lora_lr=0.01", "train_setup.lora_dropout=0.5"],
    ),
    "train_setup.lora_bias": (
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_bias=all"],
    ),
    "train_setup.lora_target_modules": (
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_target_modules=[q_proj]"],
    ),
    "train_setup.learning_rate": ([], ["train_setup.learning_rate=0.01"]),
    "train_setup.action_token_lr": ([], ["train_setup.action_token_lr=0.01"]),
    "train_setup.lora_lr": (
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_lr=0.01"],
    ),
    "train_setup.backbone_lr": (
        ["train_setup.strategy=full"],
        ["train_setup.strategy=full", "train_setup.backbone_lr=0.01"],
    ),
    "train_setup.vision_lr": (
        ["train_setup.strategy=full"],
        ["train_setup.strategy=full", "train_setup.vision_lr=0.01"],
    ),
    "train_setup.lora_layers": (
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_layers=1"],
    ),
    "train_setup.layer_lr_decay": (
        ["train_setup.strategy=full"],
        ["train_setup.strategy=full", "train_setup.layer_lr_decay=0.5"],
    ),
}
TRAINER: dict[str, tuple[list[str], list[str]]] = {
    "trainer.max_epochs": (
        ["trainer.max_steps=-1"],
        ["trainer.max_steps=-1", "trainer.max_epochs=2"],
    ),
    "trainer.max_steps": ([], ["trainer.max_steps=2"]),
    "trainer.batch_size": ([], ["trainer.batch_size=4"]),
    "trainer.consecutive_windows": ([], ["trainer.consecutive_windows=4"]),
    "trainer.precision": ([], ["trainer.precision=bf16-mixed"]),
    "trainer.accumulate_grad_batches": ([], ["trainer.accumulate_grad_batches=2"]),
    "trainer.gradient_clip_val": ([], ["trainer.gradient_clip_val=0.001"]),
    "trainer.weight_decay": ([], ["trainer.weight_decay=0.5"]),
    "trainer.warmup_steps": ([], ["trainer.warmup_steps=2"]),
    "trainer.warmup_epochs": ([], ["trainer.warmup_epochs=1"]),
    "trainer.lr_schedule": (
        ["trainer.max_steps=6"],
        ["trainer.max_steps=6", "trainer.lr_schedule=constant"],
    ),
    "trainer.min_lr_scale": (
        ["trainer.max_steps=6"],
        ["trainer.max_steps=6", "trainer.min_lr_scale=0.9"],
    ),
    "trainer.accelerator": ([], ["trainer.accelerator=gpu"]),
    "trainer.log_every_n_steps": ([], ["trainer.log_every_n_steps=2"]),
    "trainer.limit_val_batches": (
        ["trainer.max_steps=-1"],
        ["trainer.max_steps=-1", "trainer.limit_val_batches=2"],
    ),
    "trainer.wandb": ([], ["trainer.wandb=true"]),
    "trainer.output_dir": ([], ["trainer.output_dir={tmp}/elsewhere"]),
    "trainer.run_name": ([], ["trainer.run_name=other"]),
    "trainer.checkpoint_steps": ([], ["trainer.checkpoint_steps=[2]"]),
    "trainer.val_every_n_steps": ([], ["trainer.val_every_n_steps=1"]),
}


@pytest.mark.parametrize("key", sorted(MODEL))
def test_model_key_has_effect(
    key: str,
    train_data: Path,
    tiny_vlms: dict[str, Path],
    tiny_weights: dict[str, Path],
    tmp_path: Path,
) -> None:
    a, b = (fmt(v, {**tiny_vlms, **tiny_weights, "tmp": tmp_path}) for v in MODEL[key])
    assert model_observable(a, train_data, tmp_path) != model_observable(b, train_data, tmp_path)


@pytest.mark.parametrize("key", sorted(TRAINER))
def test_trainer_key_has_effect(key: str, train_data: Path, tmp_path: Path) -> None:
    a, b = (fmt(v, {"tmp": tmp_path}) for v in TRAINER[key])
    assert trainer_observable(a, train_data, tmp_path) != trainer_observable(
        b, train_data, tmp_path
    )


def test_num_workers_has_effect_and_keeps_results(train_data: Path, tmp_path: Path) -> None:
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.training.run import make_loaders

    from .conftest import tiny_overrides

    cfg = load_config(None, [*tiny_overrides(train_data, tmp_path), "trainer.num_workers=1"])
    train_loader, val_loader = make_loaders(cfg, build_datasets(cfg))
    assert train_loader.num_workers == val_loader.num_workers == 1
    # worker processes change where samples are made, not what they are
    assert trainer_observable(
        ["trainer.num_workers=1"], train_data, tmp_path
    ) == trainer_observable([], train_data, tmp_path)


def test_gradual_every_steps_has_effect(train_data: Path, tmp_path: Path) -> None:
    from mobile_vla.training.checkpoint import load_folder
    from mobile_vla.training.run import train

    from .conftest import tiny_overrides

    stages = {}
    for every in (0, 1):
        cfg = load_config(
            None,
            [
                *tiny_overrides(train_data, tmp_path),
                "trainer.max_steps=3",
                "train_setup.strategy=gradual",
                f"trainer.run_name=g{every}",
                f"train_setup.gradual_every_steps={every}",
            ],
        )
        stages[every] = load_folder(train(cfg, progress=False) / "checkpoints" / "last")[
            "gradual_stage"
        ]
    assert stages[0] == 0  # once per epoch: still in the first epoch
    assert stages[1] == 2  # unfroze at steps 1 and 2
