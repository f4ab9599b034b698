"""The Lightning trainer, run folders, checkpoints, resume, offline metrics, RoboVLMs configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from mobile_vla.cli import main
from mobile_vla.config import load_config
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.evaluation.offline import (
    direction_accuracy,
    episode_batches,
    evaluate_offline,
    instruction_sensitivity,
    regression_metrics,
)
from mobile_vla.evaluation.results import OfflineMetrics
from mobile_vla.training.checkpoint import CheckpointError, load_folder, save_folder, saved_step
from mobile_vla.training.common import warmup_cosine
from mobile_vla.training.run import train
from mobile_vla.training.runs import load_policy

from .conftest import tiny_overrides


class StopAfterFirstEpoch(pl.Callback):
    """Simulates an interruption after epoch 0 (its checkpoint is written)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.should_stop = True


class GradNorms(pl.Callback):
    """Gradient norm as the optimizer sees it (after clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )


class KeepPredictions(pl.Callback):
    """Predictions of the in-memory policy at the end of training, on a fixed batch."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch
        self.pred: np.ndarray | None = None

    def on_train_end(self, trainer, module) -> None:
        module.policy.eval()
        self.pred = module.policy.predict(
            self.batch["images"], self.batch["instruction"], self.batch["obs_mask"]
        )


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "images": torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8, generator=g),
        "instruction": ["pass the box on the left", "pass the box on the right"],
        "obs_mask": torch.ones(2, 3, dtype=torch.bool),
    }


def cfg_for(
    train_data: Path, tmp: Path, *extra: str, backbone: str = "builtin", vlms: dict | None = None
):
    return load_config(None, [*tiny_overrides(train_data, tmp, backbone, vlms), *extra])


def test_train_writes_a_complete_run_and_eval_writes_metrics(train_data, tmp_path, capsys) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("parent: " + str(Path(__file__).parents[1] / "configs/base.yaml") + "\n")
    args = [
        "train",
        str(cfg_path),
        "-q",
        *("--" + o for o in tiny_overrides(train_data, tmp_path)),
        "--trainer.run_name=r1",
        "--trainer.max_epochs=2",
        "--data.test_fraction=0.1",
    ]
    assert main(args) == 0
    run = tmp_path / "runs" / "r1"
    for name in (
        "config.yaml",
        "stats.json",
        "split.json",
        "params.json",
        "train_stats.json",
        "checkpoints/last/tensors.safetensors",
        "checkpoints/best/state.json",
        "logs/csv/metrics.csv",
    ):
        assert (run / name).exists(), name
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    params = json.loads((run / "params.json").read_text())
    assert params["params"]["all"]["trainable"] == (
        params["params"]["head"]["total"] + params["params"]["action_token"]["total"]
    )
    stats = json.loads((run / "train_stats.json").read_text())
    assert stats["train_samples_per_s"] > 0 and stats["peak_memory_bytes"] > 0
    assert stats["epochs"] == 2
    csv = (run / "logs" / "csv" / "metrics.csv").read_text()
    assert "val_loss" in csv and "train_loss" in csv
    # the same run again is refused rather than overwritten
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    assert main(["eval", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "direction_accuracy" in out
    metrics = json.loads((run / "metrics.json").read_text())["offline"]
    split = json.loads((run / "split.json").read_text())
    # with a test split, best is chosen on val and the figures are on test
    assert metrics["episodes"] == len(split["test"]) > 0 and metrics["split"] == "test"
    assert not set(split["test"]) & set(split["val"])
    assert set(metrics["rmse"]) == {"linear_x", "linear_y", "all"}
    assert metrics["direction_accuracy"]["threshold"] == 0.1
    assert 0.0 <= metrics["instruction_sensitivity"]["sign_flip_rate"] <= 1.0
    assert metrics["samples"] == metrics["instruction_sensitivity"]["count"] > 0
    typed = OfflineMetrics.from_json(metrics)  # the file reads back as the typed record
    assert typed.to_json() == metrics and typed.split == "test"


@pytest.mark.parametrize("strategy", ["frozen", "lora"])
def test_resume_equals_uninterrupted(strategy, train_data, tmp_path) -> None:
    extra = [
        f"train_setup.strategy={strategy}",
        "trainer.max_epochs=2",
        "trainer.warmup_steps=3",
        "train_setup.lora_dropout=0.2",
        "data.augment.mirror_prob=0.5",
    ]
    train(cfg_for(train_data, tmp_path, *extra, "trainer.run_name=whole"), progress=False)
    cut = tmp_path / "runs" / "cut"
    train(
        cfg_for(train_data, tmp_path, *extra, "trainer.run_name=cut"),
        progress=False,
        callbacks=[StopAfterFirstEpoch()],
    )
    first = load_folder(cut / "checkpoints" / "last")
    assert first["epoch"] == 0
    assert first["mobile_vla"]["config"]["train_setup"]["strategy"] == strategy
    assert first["mobile_vla"]["stats"] == json.loads((cut / "stats.json").read_text())
    assert main(["train", "--resume", str(cut), "-q"]) == 0
    a = load_folder(tmp_path / "runs" / "whole" / "checkpoints" / "last")
    b = load_folder(cut / "checkpoints" / "last")
    assert a["global_step"] == b["global_step"] > first["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-5, atol=1e-6)
    # the interrupted run's logs were kept beside the resumed run's
    assert (cut / "logs" / "csv" / "metrics.csv").exists()
    assert (cut / "logs" / "csv-2" / "metrics.csv").exists()


class KillAtStep(pl.Callback):
    """Simulates a crash in the middle of an epoch (after some epochs' checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_a_run_killed_mid_epoch_ends_at_max_steps_like_the_whole_run(train_data, tmp_path) -> None:
    extra = ["trainer.max_epochs=100", "trainer.max_steps=50"]
    whole = train(cfg_for(train_data, tmp_path, *extra, "trainer.run_name=w"), progress=False)
    cut_cfg = cfg_for(train_data, tmp_path, *extra, "trainer.run_name=c")
    cut = tmp_path / "runs" / "c"
    for step in (20, 40):  # two crashes, each mid-epoch (an epoch is 15 steps here)
        with pytest.raises(RuntimeError, match="killed"):
            train(
                cut_cfg,
                resume=cut if step > 20 else None,
                progress=False,
                callbacks=[KillAtStep(step)],
            )
        assert 0 < load_folder(cut / "checkpoints" / "last")["global_step"] < step
    train(cut_cfg, resume=cut, progress=False)
    a = load_folder(whole / "checkpoints" / "last")
    b = load_folder(cut / "checkpoints" / "last")
    assert a["global_step"] == b["global_step"] == 50
    assert json.loads((cut / "train_stats.json").read_text())["global_step"] == 50
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-5, atol=1e-6)


def test_a_resumed_run_counts_epochs_like_the_whole_run(train_data, tmp_path) -> None:
    """With max_epochs binding (and max_steps set, out of reach): Lightning restored at an
    epoch's end counted each later epoch once more, so every resume ended the run an epoch
    early (bench/bench_kills.py: 20 kills, 720 of 36,000 steps missing; here 56 of 70 steps)."""
    extra = ["trainer.max_epochs=5", "trainer.max_steps=100000"]
    whole = train(cfg_for(train_data, tmp_path, *extra, "trainer.run_name=we"), progress=False)
    a = load_folder(whole / "checkpoints" / "last")
    per_epoch = a["global_step"] // 5
    cut_cfg = cfg_for(train_data, tmp_path, *extra, "trainer.run_name=ce")
    cut = tmp_path / "runs" / "ce"
    with pytest.raises(RuntimeError, match="killed"):
        train(cut_cfg, progress=False, callbacks=[KillAtStep(per_epoch + 2)])
    train(cut_cfg, resume=cut, progress=False)
    b = load_folder(cut / "checkpoints" / "last")
    assert b["global_step"] == a["global_step"] == 5 * per_epoch
    counts = b["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert counts["processed"] == counts["completed"] + 1 == 5
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-5, atol=1e-6)


RESAMPLER = [  # RoboVLMs' perceiver resampler, small
    "backbone.resampler.enabled=true",
    "backbone.resampler.depth=2",
    "backbone.resampler.dim_head=8",
    "backbone.resampler.heads=2",
    "backbone.resampler.num_latents=4",
]


@pytest.mark.parametrize(
    ("backbone", "extra"),
    [
        ("builtin", []),
        ("kosmos2", []),
        ("llava", []),
        ("idefics3", []),
        ("qwen2_vl", []),
        ("qwen2_5_vl", []),
        ("llava", RESAMPLER),
    ],
)
def test_save_then_load_gives_identical_predictions(
    backbone, extra, train_data, tiny_vlms, tmp_path
) -> None:
    keep = KeepPredictions(fixed_batch())
    cfg = cfg_for(
        train_data,
        tmp_path,
        "train_setup.strategy=lora",
        "trainer.run_name=s",
        "trainer.max_steps=6",
        *extra,
        backbone=backbone,
        vlms=tiny_vlms,
    )
    run = train(cfg, progress=False, callbacks=[keep])
    policy, _ = load_policy(run, "last", merge=False)
    b = fixed_batch()
    np.testing.assert_array_equal(
        policy.predict(b["images"], b["instruction"], b["obs_mask"]), keep.pred
    )
    merged, _ = load_policy(run, "last")  # LoRA folded into the weights: float rounding only
    np.testing.assert_allclose(
        merged.predict(b["images"], b["instruction"], b["obs_mask"]), keep.pred, atol=1e-5
    )


def test_gradient_clip_val_is_applied(train_data, tmp_path) -> None:
    norms = {}
    for clip in (0.0, 1e-3):
        rec = GradNorms()
        cfg = cfg_for(
            train_data,
            tmp_path,
            f"trainer.gradient_clip_val={clip}",
            f"trainer.run_name=clip{clip}",
            "trainer.max_steps=4",
        )
        train(cfg, progress=False, callbacks=[rec])
        norms[clip] = rec.norms
    assert min(norms[0.0]) > 1e-3
    assert max(norms[1e-3]) <= 1e-3 * 1.0001


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_uses_bf16_where_native_and_records_it(
    native, train_data, tmp_path, monkeypatch
) -> None:
    from mobile_vla import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    cfg = cfg_for(
        train_data, tmp_path, "trainer.precision=auto", "trainer.max_steps=3", "trainer.run_name=p"
    )
    run = train(cfg, progress=False)
    stats = json.loads((run / "train_stats.json").read_text())
    assert stats["precision"] == ("bf16-mixed" if native else "32")
    state = load_folder(run / "checkpoints" / "last")
    assert all(
        v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point()
    )


def test_checkpoint_from_another_architecture_is_refused(train_data, tmp_path) -> None:
    cfg = cfg_for(train_data, tmp_path, "trainer.run_name=a", "trainer.max_steps=2")
    run = train(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"another architecture.*head"):
        load_policy(run, overrides=["head.type=mlp"])
    with pytest.raises(ConfigError, match="another architecture"):
        load_policy(run, overrides=["head.hidden_size=16"])
    assert main(["train", "--resume", str(run), "--head.hidden_size=16", "-q"]) == 2


def test_incomplete_run_folder_and_corrupt_checkpoint(tmp_path) -> None:
    with pytest.raises(MobileVLAError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(MobileVLAError, match=r"incomplete: missing stats\.json, split\.json"):
        load_policy(tmp_path / "r")
    save_folder({"x": torch.ones(2)}, tmp_path / "ck")
    (tmp_path / "ck" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_folder(tmp_path / "ck")
    (tmp_path / "ck" / "checksum.json").unlink()  # as written before checksums were stored
    with pytest.raises(CheckpointError, match="corrupt"):
        load_folder(tmp_path / "ck")


def _poison_first_float(path: Path) -> None:
    """Overwrite the first 4 bytes of tensor data with a float32 NaN, in place."""
    raw = bytearray((path / "tensors.safetensors").read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header : header + 4] = np.float32("nan").tobytes()
    (path / "tensors.safetensors").write_bytes(bytes(raw))


def test_saved_step_reads_the_json_part_only(tmp_path) -> None:
    ck = save_folder({"global_step": 37, "state_dict": {"w": torch.ones(3)}}, tmp_path / "ck")
    (ck / "tensors.safetensors").write_bytes(b"not read")  # the tensors are never opened
    assert saved_step(ck) == 37
    (ck / "state.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"state\.json is unreadable"):
        saved_step(ck)


def test_checkpoint_integrity_nan_weights_and_crash_between_renames(tmp_path) -> None:
    ck = tmp_path / "last"
    save_folder({"state_dict": {"w": torch.ones(4)}}, ck)
    _poison_first_float(ck)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_folder(ck)
    (ck / "checksum.json").unlink()
    with pytest.raises(CheckpointError, match="tensor 'w' holds NaN"):
        load_folder(ck)
    save_folder({"state_dict": {"w": torch.full((4,), float("inf"))}}, ck)
    with pytest.raises(CheckpointError, match="tensor 'w' holds NaN or infinite"):
        load_folder(ck)

    # a crash between the two renames: 'last' gone, the previous version complete as .last.old
    save_folder({"state_dict": {"w": torch.zeros(4)}}, ck)
    ck.rename(tmp_path / ".last.old")
    (tmp_path / ".last.abc123").mkdir()  # the new version's temporary folder, half written
    assert load_folder(ck)["state_dict"]["w"].sum() == 0 and ck.is_dir()
    save_folder({"state_dict": {"w": torch.ones(4)}}, ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the stale temp is gone


def test_checkpoints_and_run_files_respect_the_umask(tmp_path) -> None:
    import os
    import stat

    from mobile_vla.io import atomic_write_json

    old = os.umask(0o022)
    try:
        save_folder({"x": torch.ones(2)}, tmp_path / "ck")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "ck") == 0o755
    assert {mode(p) for p in (tmp_path / "ck").iterdir()} == {0o644}
    assert mode(tmp_path / "m.json") == 0o644


def test_a_run_killed_in_its_first_checkpoint_write_starts_again(train_data, tmp_path) -> None:
    cfg = cfg_for(train_data, tmp_path, "trainer.run_name=k", "trainer.max_steps=2")
    stale = tmp_path / "runs" / "k" / "checkpoints" / ".last.x1y2"
    stale.mkdir(parents=True)
    (stale / "tensors.safetensors").write_bytes(b"half")
    with pytest.raises(MobileVLAError, match="stopped before its first checkpoint"):
        train(cfg, resume=tmp_path / "runs" / "k", progress=False)
    run = train(cfg, progress=False)
    assert load_folder(run / "checkpoints" / "last")["global_step"] == 2 and not stale.exists()


def test_checkpoint_format_round_trip_without_pickle(tmp_path) -> None:
    import random

    state = {
        "model": {"w": torch.randn(3, 2)},
        "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"betas": (0.9, 0.99)}]},
        "rng": {"np": np.random.get_state(), "py": random.getstate()},
        "inf": float("inf"),
    }
    save_folder(state, tmp_path / "c")
    back = load_folder(tmp_path / "c")
    torch.testing.assert_close(back["model"]["w"], state["model"]["w"])
    assert back["opt"]["state"][0]["step"] == 3.0 and back["opt"]["groups"][0]["betas"] == (
        0.9,
        0.99,
    )
    assert back["inf"] == float("inf")
    np.random.set_state(back["rng"]["np"])
    random.setstate(back["rng"]["py"])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "checksum.json",
        "state.json",
        "tensors.safetensors",
    ]


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


# ---- metrics ----------------------------------------------------------------------------------


def test_metric_math_against_hand_computed_values() -> None:
    pred = np.array([[[1.0, 0.5], [0.0, -1.0]], [[2.0, 0.0], [9.0, 9.0]]])
    target = np.array([[[0.0, 0.5], [0.0, 1.0]], [[1.0, -0.5], [0.0, 0.0]]])
    mask = np.array([[True, True], [True, False]])  # the last step is padding
    m = regression_metrics(pred, target, mask, ["linear_x", "linear_y"])
    # valid errors: x: 1, 0, 1 ; y: 0, -2, 0.5
    assert m["rmse"]["linear_x"] == pytest.approx(np.sqrt(2 / 3))
    assert m["rmse"]["linear_y"] == pytest.approx(np.sqrt(4.25 / 3))
    assert m["rmse"]["all"] == pytest.approx(np.sqrt(6.25 / 6))
    assert m["mae"]["linear_y"] == pytest.approx(2.5 / 3)
    assert m["valid_steps"] == 3
    d = direction_accuracy(pred[..., 1], target[..., 1], mask, threshold=0.1)
    # targets above threshold: 0.5 (pred 0.5, same), 1.0 (pred -1, wrong), -0.5 (pred 0, wrong)
    assert d.count == 3 and d.value == pytest.approx(1 / 3)
    s = instruction_sensitivity(np.array([0.5, -0.2, 0.0, 1.0]), np.array([-0.5, -0.4, 0.3, 1.0]))
    assert s.mean_abs_diff == pytest.approx((1.0 + 0.2 + 0.3 + 0.0) / 4)
    assert s.sign_flip_rate == pytest.approx(0.25)
    assert s.quantiles["0.5"] == pytest.approx(0.25)  # of |diff| = 1.0, 0.2, 0.3, 0.0
    assert sum(s.histogram.counts) == 4 and s.histogram.edges[-1] == 1.0


def test_offline_batches_hold_whole_episodes_and_do_not_change_the_metrics(
    train_data, tmp_path
) -> None:
    """Offline evaluation batches whole episodes (each frame encoded once per batch); the
    metrics are those of any other partition of the same windows."""
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.training.runs import build_policy

    index = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [2, 0], [2, 1]])
    ds = type("D", (), {"index": index, "__len__": lambda self: 6})()
    assert episode_batches(ds, 2) == [[0, 1, 2], [3, 4, 5]]
    assert episode_batches(ds, 1) == [[0, 1, 2], [3], [4, 5]]
    plain = type("P", (), {"__len__": lambda self: 5})()
    assert episode_batches(plain, 2) == [[0, 1], [2, 3], [4]]
    cfg = cfg_for(train_data, tmp_path)
    bundle = build_datasets(cfg)
    policy, _ = build_policy(cfg, bundle.stats)
    a, b = evaluate_offline(policy, bundle.val, 3), evaluate_offline(policy, bundle.val, 64)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
    assert a.rmse == pytest.approx(b.rmse, rel=1e-5) and a.samples == b.samples


def test_language_blind_policy_scores_zero_sensitivity(train_data, tmp_path) -> None:
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.training.runs import build_policy

    cfg = cfg_for(train_data, tmp_path)
    bundle = build_datasets(cfg)
    policy, _ = build_policy(cfg, bundle.stats)
    policy.eval()
    seeing = evaluate_offline(policy, bundle.val).instruction_sensitivity
    with torch.no_grad():  # cut the text path: the fusion sees the same text tokens always
        for p in policy.backbone.text_proj.parameters():
            p.zero_()
    blind = evaluate_offline(policy, bundle.val)
    assert blind.instruction_sensitivity.mean_abs_diff == pytest.approx(0.0, abs=1e-6)
    assert blind.instruction_sensitivity.sign_flip_rate == 0.0
    assert seeing.mean_abs_diff > 1e-4
    assert blind.val_loss > 0 and blind.rmse["all"] > 0


# ---- RoboVLMs configs -------------------------------------------------------------------------

ROBOVLMS = {
    "robovlm_name": "RoboKosMos",
    "model": "kosmos",
    "window_size": 8,
    "fwd_pred_next_n": 10,
    "learning_rate": 1e-4,
    "batch_size": 4,
    "max_epochs": 10,
    "precision": "bf16",
    "gradient_clip_val": 1.0,
    "train_setup": {
        "freeze_backbone": True,
        "train_vision": False,
        "lora_enable": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "gradient_checkpointing": True,
        "predict_caption": False,
    },
    "act_head": {
        "type": "LSTMDecoder",
        "hidden_size": 512,
        "action_dim": 2,
        "window_size": 8,
        "fwd_pred_next_n": 10,
        "history_type": "post",
        "down_sample": "none",
    },
    "vlm": {
        "name": "kosmos",
        "pretrained_model_name_or_path": ".vlms/kosmos-2-patch14-224",
        "type": "AutoModelForVision2Seq",
    },
    "trainer": {"strategy": "ddp", "accumulate_grad_batches": 2, "val_check_interval": 500},
}


def test_robovlms_config_is_accepted_directly_and_converted(tmp_path, capsys, caplog) -> None:
    path = tmp_path / "robovlms.json"
    path.write_text(json.dumps(ROBOVLMS))
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    assert cfg.backbone.name == "kosmos2" and cfg.backbone.path == ".vlms/kosmos-2-patch14-224"
    assert cfg.train_setup.strategy == "lora" and cfg.train_setup.lora_r == 8
    assert cfg.train_setup.gradient_checkpointing is True
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.accumulate_grad_batches == 2 and cfg.trainer.strategy == "ddp"
    assert cfg.head.type == "lstm" and cfg.head.hidden_size == 512
    assert cfg.data.action_dims == ["linear_x", "linear_y"] and cfg.data.window_size == 8
    for key in (
        "robovlm_name",
        "train_setup.predict_caption",
        "act_head.down_sample",
        "trainer.val_check_interval",
        "vlm.type",
    ):
        assert key in caplog.text  # reported, not silently dropped
    out = tmp_path / "converted.yaml"
    assert main(["import-config", str(path), "--out", str(out)]) == 0
    assert "have no meaning here" in capsys.readouterr().out
    assert load_config(out) == cfg
    assert main(["import-config", str(path), "--out", str(out)]) == 2  # no silent overwrite
    arm = tmp_path / "arm.json"  # 6 arm dims + gripper: the base's velocities, overridable
    arm.write_text(json.dumps({**ROBOVLMS, "act_head": {**ROBOVLMS["act_head"], "action_dim": 7}}))
    assert load_config(arm).data.action_dims == ["linear_x", "linear_y", "angular_z"]
    assert load_config(arm, ["--data.action_dims=[linear_x]"]).data.action_dims == ["linear_x"]
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="not a RoboVLMs config"):
        load_config(tmp_path / "other.json")


# ---- distributed ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.serial
def test_two_process_ddp_on_cpu(train_data, tmp_path) -> None:
    over = [
        *tiny_overrides(train_data, tmp_path),
        "trainer.run_name=ddp",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=3",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text("seed: 0\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobile_vla.cli",
            "-v",
            "train",
            str(cfg),
            "-q",
            *("--" + o for o in over),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last"]  # max_steps ends the epoch before validation: no "best" yet
    state = load_folder(run / "checkpoints" / "last")
    assert state["global_step"] == 3
    log = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in log and "MEMBER: 2/2" in log  # two processes, gloo
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports


def test_train_stats_time_the_loop_including_data_loading(monkeypatch) -> None:
    """A batch counts from the end of the one before it (its fetch and collate included);
    the first batches, and a batch after an epoch start or a validation pass, are not timed."""
    from mobile_vla.training import module as module_mod

    # each batch: its start, then its end; the loop time is end to end, the step start to end
    clock = iter([-1, 0, 0.5, 1, 2, 3, 9, 10, 11.5, 12, 19, 20, 20.5, 21])
    monkeypatch.setattr(module_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stats = module_mod.TrainStatsMeter(warmup_steps=1)
    batch = {"instruction": ["go"] * 4}

    def end() -> None:
        stats.on_train_batch_start(None, None, batch, 0)
        stats.on_train_batch_end(None, None, None, batch, 0)

    stats.on_train_epoch_start(None, None)
    end()  # ends at 0: warm-up
    end()  # ends at 1: loop 1 s, step 0.5 s
    end()  # ends at 3: loop 2 s, step 1 s
    stats.on_validation_start(None, None)
    end()  # ends at 10: after validation, not timed
    end()  # ends at 12: loop 2 s, step 0.5 s
    stats.on_train_epoch_start(None, None)
    end()  # ends at 20: first of an epoch, not timed
    end()  # ends at 21: loop 1 s, step 0.5 s
    result = stats.result()
    assert result["steady_state_batches"] == 4
    assert result["train_samples_per_s"] == pytest.approx(16 / 6)
    assert result["train_step_samples_per_s"] == pytest.approx(16 / 2.5)
    assert result["train_windows_per_s"] == pytest.approx(16 / 6)  # one window a row


def test_supervised_windows_count_each_real_frame_of_per_step_windows() -> None:
    """One-window-per-frame batches supervise a pair per row; per-step batches one per frame
    whose chunk has an action (padding frames after the episode's end count nothing)."""
    from mobile_vla.training.module import supervised_windows

    rows = {"instruction": ["go"] * 3, "action_mask": torch.ones(3, 10, dtype=torch.bool)}
    assert supervised_windows(rows) == 3
    mask = torch.ones(2, 8, 10, dtype=torch.bool)
    mask[1, 5:] = False  # the second window's episode ends after its 5th frame
    mask[0, 7, 1:] = False  # a last frame whose chunk has one action left still counts
    assert supervised_windows({"instruction": ["go"] * 2, "action_mask": mask}) == 13


def test_consecutive_window_batches_share_frames_and_cover_every_window_once(
    train_data, tmp_path
) -> None:
    """``trainer.consecutive_windows: k`` shuffles runs of k consecutive windows of one
    episode: every window once per epoch, each run whole and in order inside the epoch's
    order, another order next epoch, the same order for the same (seed, epoch); a batch then
    holds far fewer distinct frames than independent windows do."""
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.training.module import EpochSampler, window_runs
    from mobile_vla.training.run import make_loaders

    cfg = cfg_for(train_data, tmp_path, "trainer.batch_size=8", "trainer.consecutive_windows=4")
    bundle = build_datasets(cfg)
    index = bundle.train.index
    runs = window_runs(index, 4)
    sampler = EpochSampler(len(index), cfg.seed, True, runs)
    order = list(sampler)
    assert sorted(order) == list(range(len(index)))
    starts = [0] + [i for i in range(1, len(order)) if runs[order[i]] != runs[order[i - 1]]]
    assert len(starts) == len(set(runs.tolist()))  # each run appears once, unbroken
    for a, b in zip(starts, [*starts[1:], len(order)], strict=True):
        assert order[a:b] == list(range(order[a], order[a] + b - a))  # consecutive windows
        assert b - a <= 4
    assert order == list(EpochSampler(len(index), cfg.seed, True, runs))
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert window_runs(index, 1) is None

    def distinct_frames(loader) -> list[int]:
        return [len(set(b["frame_id"].flatten().tolist())) for b in loader]

    grouped, _ = make_loaders(cfg, bundle)
    window = cfg.data.window_size
    shared = distinct_frames(grouped)
    for b, frames in zip(grouped, shared, strict=True):
        pieces = len(set(zip(b["episode"].tolist(), (b["frame"] // 4).tolist(), strict=True)))
        assert frames <= len(b["frame"]) + pieces * (window - 1)  # a run's windows share frames
    single, _ = make_loaders(cfg_for(train_data, tmp_path, "trainer.batch_size=8"), bundle)
    assert sum(shared) < 0.8 * sum(distinct_frames(single))
    with pytest.raises(ConfigError, match=r"trainer\.consecutive_windows"):
        cfg_for(train_data, tmp_path, "trainer.consecutive_windows=0")


def test_instruction_aux_loss_reads_the_side_and_needs_both_sides() -> None:
    """The auxiliary read-out's loss: low when the standardized action-token output tells the
    sides apart along the read-out's direction, ln 2 for a read-out that cannot, None when
    there is nothing to tell apart."""
    from mobile_vla.training.module import instruction_aux_loss

    texts = ["go left", "go right"] * 8 + ["go ahead"]
    sides = torch.tensor([1.0, -1.0] * 8 + [0.0])
    frames = torch.randn(17, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    frames[:, 0] += sides  # the side along feature 0
    readout = torch.nn.Linear(6, 1)
    with torch.no_grad():
        readout.weight.zero_()
        readout.bias.zero_()
    assert float(instruction_aux_loss(readout, frames, texts)) == pytest.approx(np.log(2))
    with torch.no_grad():
        readout.weight[0, 0] = 10.0
    assert float(instruction_aux_loss(readout, frames, texts)) < 0.01
    assert instruction_aux_loss(readout, frames[:3], ["go left"] * 3) is None
    assert instruction_aux_loss(readout, frames[:1], ["go ahead"]) is None


def test_instruction_aux_trains_beside_the_policy_and_stays_out_of_it(train_data, tmp_path) -> None:
    """With train_setup.instruction_aux_weight the run logs the read-out's loss, its tensors
    are in the checkpoint (resume) but not in the loaded policy, and the budget the report
    states is in train_stats.json (pairs seen, timeline, cache seconds)."""
    over = tiny_overrides(train_data, tmp_path)
    cfg = load_config(
        None,
        [
            *over,
            "trainer.run_name=aux",
            "train_setup.instruction_aux_weight=1.0",
            "trainer.max_epochs=2",
        ],
    )
    run = train(cfg, progress=False)
    csv = (run / "logs" / "csv" / "metrics.csv").read_text()
    assert "train_instruction_aux" in csv and "val_instruction_aux" in csv
    state = load_folder(run / "checkpoints" / "last")["state_dict"]
    assert {"aux_readout.weight", "aux_readout.bias"} <= set(state)
    policy, _ = load_policy(run, "last")
    assert not any("aux" in k for k in policy.state_dict())
    params = [g["name"] for g in json.loads((run / "params.json").read_text())["groups"]]
    assert "instruction_aux" not in params  # the read-out is not a policy parameter group
    stats = json.loads((run / "train_stats.json").read_text())
    assert stats["windows_seen"] >= stats["global_step"] * 1
    assert stats["timeline"][-1][0] == stats["global_step"] and stats["timeline"][-1][1] > 0
    assert stats["feature_cache_s"] >= 0


def test_counterfactual_pairs_keep_each_twin_beside_its_source() -> None:
    """trainer.counterfactual_pairs: the sampler shuffles each twin's windows together with its
    source's first window, every index once per epoch; a dataset without twins is unchanged."""
    from mobile_vla.training.module import EpochSampler, counterfactual_groups

    def ep(name: str, source: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(path=Path(f"{name}.h5"), source=source)

    episodes = [ep("a"), ep("b"), ep("a_cf", "a"), ep("b_cf", "b"), ep("c")]
    # a has two windows (frames 0 and 24), the others one each
    index = np.array([[0, 0], [0, 24], [1, 0], [2, 0], [3, 0], [4, 0]])
    groups = counterfactual_groups(episodes, index)
    assert [g.tolist() for g in groups] == [[0, 3], [1], [2, 4], [5]]
    sampler = EpochSampler(len(index), 0, True, groups=groups)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(6))
        assert order.index(3) == order.index(0) + 1 and order.index(4) == order.index(2) + 1
    assert counterfactual_groups([ep("a"), ep("b")], index[:2]) is None
    with pytest.raises(ValueError, match="every index exactly once"):
        EpochSampler(6, 0, True, groups=[np.array([0, 1])])
    with pytest.raises(ConfigError, match="counterfactual_pairs"):
        load_config(None, ["trainer.counterfactual_pairs=true", "trainer.consecutive_windows=8"])
