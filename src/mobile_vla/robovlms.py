"""RoboVLMs JSON configs: accepted directly (``mobile-vla train config.json``) or converted
(``mobile-vla import-config config.json --out config.yaml``).

Every key is either mapped to a key here or reported as having no meaning here; nothing is
dropped silently (the fate of RoboVLMs' own gradient clipping and checkpointing keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobile_vla.errors import ConfigError

TOP = {
    "seed": "seed",
    "window_size": "data.window_size",
    "fwd_pred_next_n": "data.fwd_pred_next_n",
    "learning_rate": "train_setup.learning_rate",
    "min_lr_scale": "trainer.min_lr_scale",
    "weight_decay": "trainer.weight_decay",
    "warmup_steps": "trainer.warmup_steps",
    "batch_size": "trainer.batch_size",
    "num_workers": "trainer.num_workers",
    "max_epochs": "trainer.max_epochs",
    "gradient_clip_val": "trainer.gradient_clip_val",
    "precision": "trainer.precision",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "arm_gripper_loss_ratio": "head.gripper_loss_ratio",
}
TRAIN_SETUP = (
    "freeze_backbone",
    "train_vision",
    "train_text_embedding",
    "freeze_resampler",
    "train_decoder_layers",
    "lora_enable",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_bias",
    "lora_target_modules",
    "gradient_checkpointing",
)
TRAINER = {
    "accelerator": "trainer.accelerator",
    "strategy": "trainer.strategy",
    "precision": "trainer.precision",
    "gradient_clip_val": "trainer.gradient_clip_val",
    "log_every_n_steps": "trainer.log_every_n_steps",
    "max_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "limit_val_batches": "trainer.limit_val_batches",
}
HEAD_TYPES = {
    "lstmdecoder": "lstm",
    "mobilevlalstmdecoder": "lstm",
    "mlpdecoder": "mlp",
    "fcdecoder": "mlp",
    "gptdecoder": "gpt",
}
VLM_NAMES = {"kosmos": "kosmos2", "kosmos2": "kosmos2", "paligemma": "paligemma"}
PRECISION = {
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "fp16": "16-mixed",
    "16-mixed": "16-mixed",
    "32": "32",
    "fp32": "32",
    "32-true": "32",
}
ACTION_DIMS = {2: ["linear_x", "linear_y"], 3: ["linear_x", "linear_y", "angular_z"]}


@dataclass
class Imported:
    tree: dict[str, Any]
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def set(self, src: str, dst: str, value: Any) -> None:
        node = self.tree
        parts = dst.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.mapped.append((src, dst))

    def summary(self) -> str:
        lines = [f"mapped {len(self.mapped)} RoboVLMs key(s):"]
        lines += [f"  {s} -> {d}" for s, d in self.mapped]
        if self.ignored:
            lines.append(f"{len(self.ignored)} key(s) have no meaning here and were not used:")
            lines += [f"  {k}" for k in self.ignored]
        return "\n".join(lines)


def is_robovlms(obj: Any) -> bool:
    return isinstance(obj, dict) and any(
        k in obj for k in ("train_setup", "act_head", "vlm", "robovlm_name")
    )


def convert(obj: dict[str, Any], source: str = "config") -> Imported:
    out = Imported({})
    for key, value in obj.items():
        if key in TOP:
            if key == "precision":
                value = _precision(value, f"{source}: {key}")
            out.set(key, TOP[key], value)
        elif key == "train_setup" and isinstance(value, dict):
            _train_setup(value, out)
        elif key == "act_head" and isinstance(value, dict):
            _act_head(value, out, obj)
        elif key == "vlm" and isinstance(value, dict):
            name = str(value.get("name", "")).lower()
            if name in VLM_NAMES:
                out.set("vlm.name", "backbone.name", VLM_NAMES[name])
            elif name:
                out.ignored.append(f"vlm.name ({name!r}: no adapter of that family)")
            path = value.get("pretrained_model_name_or_path")
            if path:
                out.set("vlm.pretrained_model_name_or_path", "backbone.path", str(path))
            out.ignored += [
                f"vlm.{k}" for k in value if k not in ("name", "pretrained_model_name_or_path")
            ]
        elif key == "trainer" and isinstance(value, dict):
            for k, v in value.items():
                if k in TRAINER and v is not None:
                    if k == "precision":
                        v = _precision(v, f"{source}: trainer.precision")
                    out.set(f"trainer.{k}", TRAINER[k], v if k != "strategy" else str(v))
                else:
                    out.ignored.append(f"trainer.{k}")
        elif key in ("train_dataset", "val_dataset") and isinstance(value, dict):
            path = value.get("data_dir") or value.get("data_root_dir")
            if path and key == "train_dataset":
                out.set(f"{key}.data_dir", "data.path", str(path))
            out.ignored += [
                f"{key}.{k}"
                for k in value
                if not (k in ("data_dir", "data_root_dir") and key == "train_dataset")
            ]
        else:
            out.ignored.append(key)
    return out


def _precision(value: Any, where: str) -> str:
    text = str(value).lower()
    if text not in PRECISION:
        raise ConfigError(f"{where} must be one of {sorted(PRECISION)}, got {value!r}")
    return PRECISION[text]


def _train_setup(ts: dict[str, Any], out: Imported) -> None:
    if ts.get("lora_enable"):
        strategy = "lora"
    elif ts.get("freeze_backbone"):
        strategy = "frozen"
    else:
        strategy = "full"
    out.set("train_setup.(lora_enable/freeze_backbone)", "train_setup.strategy", strategy)
    for k, v in ts.items():
        if k in TRAIN_SETUP and v is not None:
            if k == "train_decoder_layers" and isinstance(v, bool):
                v = -1 if v else 0
            out.set(f"train_setup.{k}", f"train_setup.{k}", v)
        elif k == "train_full_decoder" and v:
            out.set("train_setup.train_full_decoder", "train_setup.train_decoder_layers", -1)
        else:
            out.ignored.append(f"train_setup.{k}")


def _act_head(head: dict[str, Any], out: Imported, top: dict[str, Any]) -> None:
    for k, v in head.items():
        if k == "type":
            t = str(v).lower()
            if t not in HEAD_TYPES:
                raise ConfigError(
                    f"act_head.type {v!r} has no equivalent here; use one of "
                    f"{sorted(set(HEAD_TYPES))}"
                )
            out.set("act_head.type", "head.type", HEAD_TYPES[t])
        elif k == "hidden_size":
            out.set("act_head.hidden_size", "head.hidden_size", int(v))
        elif k == "num_layers":
            out.set("act_head.num_layers", "head.num_layers", int(v))
        elif k == "action_space":
            if v not in ("continuous", "discrete"):
                raise ConfigError(
                    f"act_head.action_space must be continuous or discrete, got {v!r}"
                )
            out.set("act_head.action_space", "head.action_space", v)
        elif k == "n_bin":
            out.set("act_head.n_bin", "head.n_bins", int(v))
        elif k == "history_type":
            if v in ("post", "pre"):
                out.set("act_head.history_type", "backbone.history", v)
            else:
                out.ignored.append(f"act_head.history_type ({v!r}: only post/pre here)")
        elif k == "action_dim":
            dims = ACTION_DIMS.get(int(v))
            if dims is None:
                raise ConfigError(
                    f"act_head.action_dim {v} cannot be mapped onto the mobile base's "
                    "[linear_x, linear_y, angular_z]; set data.action_dims instead"
                )
            out.set("act_head.action_dim", "data.action_dims", dims)
        elif k in ("window_size", "fwd_pred_next_n"):
            if k in top and top[k] != v:
                raise ConfigError(f"act_head.{k}={v} disagrees with the top-level {k}={top[k]}")
            if k not in top:
                out.set(f"act_head.{k}", f"data.{k}", v)
        else:
            out.ignored.append(f"act_head.{k}")


def load_robovlms(path: str | Path) -> Imported:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid JSON ({exc})") from None
    if not is_robovlms(obj):
        raise ConfigError(
            f"config file '{path}' is JSON but not a RoboVLMs config (no "
            "train_setup, act_head or vlm)"
        )
    return convert(obj, str(path))
