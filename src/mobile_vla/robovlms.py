"""RoboVLMs JSON configs: accepted directly (``mobile-vla train config.json``) or converted
(``mobile-vla import-config config.json --out config.yaml``), with RoboVLMs' meaning.

Every key ends up in one of three places, and the summary lists all three:

* **mapped** to a key here, with a note where RoboVLMs' meaning needs a translation (one
  learning rate for every trainable parameter, a constant schedule unless ``scheduler`` says
  otherwise, the head's window taken from the top level, ``train_split`` as a validation
  fraction, ``norm_action`` as fixed bounds, ``model_load_path`` as initial weights);
* **no meaning here**, with the reason (auxiliary losses not trained here, GPU and logging
  settings, LLaVA projector options, ...);
* **refused** with one sentence, for settings whose training cannot be reproduced here (a
  perceiver resampler, a hand camera, a policy head of another kind).

``parent`` is merged the way RoboVLMs merges it (the parent first, the child's keys over it,
nested objects merged key by key unless they carry ``"__override__": true``); a parent path is
read relative to the child, and an absolute path that does not exist on this machine (configs
written elsewhere) by its file name beside the child. Facts from RoboVLMs' ``main.py``,
``base_trainer.py`` and policy heads, and the Mobile-VLA project's configs and decoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobile_vla.errors import ConfigError

TOP = {
    "seed": "seed",
    "batch_size": "trainer.batch_size",
    "num_workers": "trainer.num_workers",
    "max_epochs": "trainer.max_epochs",
    "weight_decay": "trainer.weight_decay",
    "min_lr_scale": "trainer.min_lr_scale",
    "warmup_steps": "trainer.warmup_steps",
    "warmup_epochs": "trainer.warmup_epochs",
    "gradient_clip_val": "trainer.gradient_clip_val",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "arm_gripper_loss_ratio": "head.gripper_loss_ratio",
    "exp_name": "trainer.run_name",
    "output_root": "trainer.output_dir",
}
TRAINER = {
    "accelerator": "trainer.accelerator",
    "strategy": "trainer.strategy",
    "gradient_clip_val": "trainer.gradient_clip_val",
    "log_every_n_steps": "trainer.log_every_n_steps",
    "max_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "limit_val_batches": "trainer.limit_val_batches",
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
HEAD_TYPES = {  # RoboVLMs / Mobile-VLA head class -> trunk here
    "lstmdecoder": "lstm",
    "mobilevlalstmdecoder": "lstm",
    "mobilevlaclassificationdecoder": "lstm",
    "mlpdecoder": "mlp",
    "fcdecoder": "mlp",
    "mlphead": "mlp",
    "gptdecoder": "gpt",
}
LSTM_DEFAULT_LAYERS = 4  # RoboVLMs' LSTMDecoder and Mobile-VLA's decoders default to 4
# RoboVLMs' family names (its `model` / `vlm.name`) and the usual spellings -> adapters here.
# RoboVLMs' own LLaVA loads the original LLaVA repository's checkpoints; the adapter here loads
# the transformers ones (llava-hf/...), which backbone.path must name.
VLM_NAMES = {
    "kosmos": "kosmos2",
    "kosmos2": "kosmos2",
    "paligemma": "paligemma",
    "llava": "llava",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
    "qwen2_vl": "qwen2_vl",
    "qwen2-vl": "qwen2_vl",
    "qwen2vl": "qwen2_vl",
    "qwen2.5_vl": "qwen2_5_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2.5-vl": "qwen2_5_vl",
}
NOT_BUILT = {  # RoboVLMs families without an adapter here, and why
    "qwen": "RoboVLMs' 'qwen' is Qwen-VL (v1, remote code); Qwen2-VL and Qwen2.5-VL are built "
    "(backbone.name=qwen2_vl or qwen2_5_vl)",
    "flamingo": "OpenFlamingo (MPT + cross-attention layers) is not in transformers",
    "mpt": "OpenFlamingo (MPT + cross-attention layers) is not in transformers",
    "moondream": "MoonDream loads remote code, not a transformers class",
    "uform": "UForm is not a transformers model",
}


def _family(name: str, key: str) -> str:
    """A RoboVLMs family name -> the adapter here, or a ConfigError that says why not."""
    if name in VLM_NAMES:
        return VLM_NAMES[name]
    why = NOT_BUILT.get(name, "no adapter of that family here")
    raise ConfigError(f"{key} {name!r}: {why} (known: {sorted(set(VLM_NAMES))})")


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
MOBILE_DIMS = ["linear_x", "linear_y", "angular_z"]
# Mobile-VLA's 6-class decoder (its docstring's order): Forward, Slide Left, Slide Right,
# Diag Left, Diag Right, Stop; as (linear_x, linear_y) in units of the teleop speed.
SIX_CLASSES = [[1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [0, 0]]
# Its 9-class order, as its inference server turns a class index into the robot's
# (linear_x, linear_y) command (``class_map`` of ``MobileVLAInference`` in the Mobile-VLA
# project's ``Mobile_VLA/inference_server.py``): Stop, Forward, Backward, Left, Right,
# Forward-Left, Forward-Right, Backward-Left, Backward-Right. Its configs' class weights follow
# that order (e.g. 2.0 for Stop and 0.2 for the most frequent class, Forward).
NINE_CLASSES = [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [-1, 1], [-1, -1]]
NINE_CLASS_NAMES = (
    "Stop, Forward, Backward, Left, Right, Forward-Left, Forward-Right, Backward-Left, "
    "Backward-Right"
)
TELEOP_SPEED = 1.15

_AUX_LOSS = "an auxiliary loss (caption, forward prediction, ...) that is not trained here"
_GPU = "GPU / cluster placement; Lightning's trainer.devices and strategy decide it here"
_LOGGING = "logging of RoboVLMs' own runner; a run folder always gets CSV and TensorBoard logs"
_LLAVA = "an option of LLaVA-style projector models; no such projector is trained here"
_GR = "an option of RoboVLMs' video-prediction (GR) variants, which are not built here"
_PROCESSOR = "the backbone's own processor resizes, normalizes and tokenizes here"
MEANINGLESS: dict[str, str] = {
    "robovlm_name": "the model class follows backbone.name here",
    "task_name": "a label of RoboVLMs' runs; the run is named by trainer.run_name",
    "model_url": "where RoboVLMs downloads the model; backbone.path names it here",
    "model_config": "read from the model folder that backbone.path names",
    "model_load_source": "how RoboVLMs reads model_load_path; here the file type decides",
    "log_root": "logs go into the run folder",
    "cache_root": "RoboVLMs' download cache; the frame and feature caches are data.cache_dir",
    "seq_len": "the caption sequence length of RoboVLMs' video-caption mode",
    "image_size": _PROCESSOR,
    "image_mean": _PROCESSOR,
    "image_std": _PROCESSOR,
    "tokenizer": _PROCESSOR,
    "cap_loss_ratio": _AUX_LOSS,
    "fwd_loss_ratio": _AUX_LOSS,
    "text_loss_ratio": _AUX_LOSS,
    "kl_div_ratio": _AUX_LOSS,
    "clip_norm_ratio": _AUX_LOSS,
    "vl_cotrain_ratio": _AUX_LOSS,
    "gpus": _GPU,
    "num_nodes": _GPU,
    "data_scale": "a repetition factor of RoboVLMs' loader; max_epochs counts passes here",
    "trainer_type": "one trainer serves every head here",
    "act_encoder": "no action encoder (action history input) is built here",
    "fwd_head": "no forward-prediction head is built here",
    "use_time_causal_attn": _GR,
    "use_mim_obs_loss": _GR,
    "use_pixel_loss": _GR,
    "use_obs_queries": _GR,
    "vision_masked_ratio": _GR,
    "use_tube_mask": _GR,
    "vision_resampler": "the settings of a resampler that use_vision_resampler leaves off",
    "train_setup.predict_forward": _AUX_LOSS,
    "train_setup.predict_forward_hand": _AUX_LOSS,
    "train_setup.predict_caption": _AUX_LOSS,
    "train_setup.freeze_mm_mlp_adapter": _LLAVA,
    "train_setup.tune_mm_mlp_adapter": _LLAVA,
    "train_setup.mm_use_im_start_end": _LLAVA,
    "train_setup.mm_use_im_patch_token": _LLAVA,
    "train_setup.mm_projector_lr": _LLAVA,
    "act_head.down_sample": "with latent 1 the head reads one vector per frame either way",
    "act_head.latent": "the head reads the backbone's action-token output per frame",
    "act_head.with_history": "the head always reads the window's history here",
    "vlm.type": "the adapter loads the family's model class",
    "trainer.logger": _LOGGING,
    "trainer.use_distributed_sampler": "the sampler here splits the data across DDP ranks",
    "trainer.val_check_interval": "validation runs once per epoch here",
    "trainer.check_val_every_n_epoch": "validation runs once per epoch here",
    "trainer.precision": "set from train_setup.precision / precision when those are given",
    "dataset.type": "the Mobile-VLA HDF5 reader reads every dataset here",
    "dataset.model_name": _PROCESSOR,
    "dataset.shift_first": "windows start at the episode's first frame here",
    "dataset.is_validation": "the validation split is drawn from data.path here",
    "dataset.discrete_action": "the head's action_space decides it",
    "dataset.data_root_dir": "data_dir names the folder here",
    "dataset.gripper_pad": "the shift augmentation of a hand camera, which a mobile base lacks",
    "deepspeed_config": "DeepSpeed's own file; trainer.strategy passes deepspeed to Lightning",
}


@dataclass
class Imported:
    tree: dict[str, Any]
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # "key (reason)"
    notes: list[str] = field(default_factory=list)  # how RoboVLMs' meaning was kept

    def set(self, src: str, dst: str, value: Any) -> None:
        node = self.tree
        parts = dst.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.mapped.append((src, dst))

    def ignore(self, key: str, reason: str | None = None) -> None:
        reason = reason or MEANINGLESS.get(key) or MEANINGLESS.get(_generic(key))
        self.ignored.append(f"{key} ({reason or 'not a key RoboVLMs reads; not used'})")

    def summary(self) -> str:
        lines = [f"mapped {len(self.mapped)} RoboVLMs key(s):"]
        lines += [f"  {s} -> {d}" for s, d in self.mapped]
        if self.notes:
            lines.append("as RoboVLMs means them:")
            lines += [f"  {n}" for n in self.notes]
        if self.ignored:
            lines.append(f"{len(self.ignored)} key(s) have no meaning here and were not used:")
            lines += [f"  {k}" for k in self.ignored]
        return "\n".join(lines)


def _generic(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"dataset.{rest}" if head in ("train_dataset", "val_dataset") else key


def is_robovlms(obj: Any) -> bool:
    return isinstance(obj, dict) and any(
        k in obj for k in ("train_setup", "act_head", "vlm", "robovlm_name")
    )


def deep_update(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """RoboVLMs' merge: the child's keys over the parent's, objects merged key by key unless
    the child's carries ``"__override__": true`` (then it replaces the parent's)."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and value.get("__override__", False):
            out[key] = {k: v for k, v in value.items() if k != "__override__"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid JSON ({exc})") from None


def resolve_parents(
    path: Path, obj: dict[str, Any], notes: list[str], seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """``obj`` with its ``parent`` chain merged in (RoboVLMs' order and merge)."""
    parent = obj.get("parent")
    obj = {k: v for k, v in obj.items() if k != "parent"}
    if parent in (None, ""):
        return obj
    if not isinstance(parent, str):
        raise ConfigError(f"config '{path}': 'parent' must be a file path, got {parent!r}")
    stated = Path(parent)
    candidates = [stated] if stated.is_absolute() else [path.parent / stated, stated]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and stated.is_absolute() and (path.parent / stated.name).is_file():
        found = path.parent / stated.name
        notes.append(f"parent {parent} does not exist here; used {found} (same file name)")
    if found is None:
        tried = ", ".join(str(c) for c in candidates)
        raise ConfigError(
            f"config '{path}': its parent '{parent}' was not found (tried {tried}"
            + (f", {path.parent / stated.name}" if stated.is_absolute() else "")
            + "); put the parent config beside it"
        )
    if found.resolve() in seen or found.resolve() == path.resolve():
        raise ConfigError(f"config '{path}' inherits from itself through '{found}'")
    parent_obj = _read_json(found)
    if not isinstance(parent_obj, dict):
        raise ConfigError(f"parent config '{found}' must hold a JSON object")
    merged_parent = resolve_parents(found, parent_obj, notes, (*seen, path.resolve()))
    notes.append(f"parent {found} merged under this config (RoboVLMs' deep update)")
    return deep_update(merged_parent, obj)


def convert(obj: dict[str, Any], source: str = "config") -> Imported:
    out = Imported({})
    head = obj.get("act_head") if isinstance(obj.get("act_head"), dict) else None
    rates: dict[str, float] = {}
    for key, value in obj.items():
        if key in TOP:
            if value is None:
                out.ignore(key, "null")
                continue
            out.set(key, TOP[key], value)
        elif key in ("window_size", "fwd_pred_next_n"):
            out.set(key, f"data.{key}", int(value))
        elif key == "learning_rate":
            rates["learning_rate"] = float(value)
        elif key == "precision":
            out.set(key, "trainer.precision", _precision(value, f"{source}: {key}"))
        elif key == "scheduler":
            pass  # with the learning rates below
        elif key == "train_setup" and isinstance(value, dict):
            _train_setup(value, out, source)
        elif key == "act_head" and isinstance(value, dict):
            _act_head(value, out, obj)
        elif key == "vlm" and isinstance(value, dict):
            _vlm(value, out)
        elif key == "trainer" and isinstance(value, dict):
            _trainer(value, out, source, obj)
        elif key in ("train_dataset", "val_dataset") and isinstance(value, dict):
            _dataset(key, value, out)
        elif key == "vision_resampler" and obj.get("use_vision_resampler"):
            pass  # with use_vision_resampler
        else:
            _top_level_other(key, value, obj, out)
    if head is None:
        out.notes.append("no act_head: the head keeps this project's default (LSTM)")
    _learning_rates(obj, rates, out)
    _normalization(obj, out)
    if isinstance(obj.get("vlm"), dict):
        for key in ("model", "model_path", "model_url"):
            if key in obj:
                out.ignore(key, "the vlm block names the model")
    elif "model" in obj:
        _model_without_vlm(obj, out)
    else:
        for key in ("model_path", "model_url"):
            if key in obj:
                out.ignore(key, "no model family is named (model or vlm.name)")
    return out


def _top_level_other(key: str, value: Any, obj: dict[str, Any], out: Imported) -> None:
    if key in ("model", "model_path", "model_url", "norm_action", "norm_min", "norm_max"):
        return  # handled after the loop, with what they depend on
    if key == "model_load_path":
        if value:
            out.set(key, "train_setup.init_checkpoint", str(value))
            out.notes.append(
                "model_load_path: its tensors initialise the policy by name (a .pt/.ckpt is "
                "read with weights_only=True; objects other than tensors are refused)"
            )
        else:
            out.ignore(key, "null")
    elif key == "resume":
        if value:
            out.ignore(key, "continue a run here with 'mobile-vla train --resume RUN'")
        else:
            out.ignore(key, "null")
    elif key == "optimizer":
        out.ignore(key, "RoboVLMs' trainer builds AdamW whatever this says; so does this one")
    elif key == "warmup_ratio":
        if value not in (None, 0, 0.0):
            raise ConfigError(
                f"warmup_ratio {value}: give the warm-up as warmup_steps or warmup_epochs"
            )
        out.ignore(key, "null")
    elif key == "use_hand_rgb":
        if value:
            raise ConfigError("use_hand_rgb: true needs a hand camera; the mobile robot has one")
        out.ignore(key, "false: one camera, as here")
    elif key == "use_vision_resampler":
        if value:
            out.set(key, "backbone.resampler.enabled", True)
            _vision_resampler(obj.get("vision_resampler"), out)
        else:
            out.ignore(key, "false: no resampler, as here")
    elif key == "discrete_action":
        out.ignore(key, "act_head.action_space decides the head's output here")
    else:
        out.ignore(key)


def _vision_resampler(block: Any, out: Imported) -> None:
    """RoboVLMs' vision_resampler block (Flamingo's PerceiverResampler arguments)."""
    if block is None:
        out.notes.append("use_vision_resampler without a vision_resampler block: the defaults")
        return
    if not isinstance(block, dict):
        raise ConfigError(f"vision_resampler must be an object, got {type(block).__name__}")
    for k, v in block.items():
        if k in ("depth", "dim_head", "heads", "num_latents"):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"vision_resampler.{k} must be an integer >= 1, got {v!r}")
            out.set(f"vision_resampler.{k}", f"backbone.resampler.{k}", v)
        elif k == "vis_dim":
            out.ignore(
                "vision_resampler.vis_dim",
                "the resampler reads the projected image tokens, at the language model's width",
            )
        else:
            out.ignore(f"vision_resampler.{k}")


def _precision(value: Any, where: str) -> str:
    text = str(value).lower()
    if text not in PRECISION:
        raise ConfigError(f"{where} must be one of {sorted(PRECISION)}, got {value!r}")
    return PRECISION[text]


def _learning_rates(obj: dict[str, Any], rates: dict[str, float], out: Imported) -> None:
    """RoboVLMs' AdamW has one parameter group: every trainable parameter (head, LoRA,
    unfrozen backbone, action token) at ``learning_rate``; its scheduler is constant unless
    ``scheduler`` says otherwise."""
    if "learning_rate" in rates:
        lr = rates["learning_rate"]
        for dst in ("learning_rate", "lora_lr", "backbone_lr", "action_token_lr"):
            out.set("learning_rate", f"train_setup.{dst}", lr)
        out.notes.append(
            f"learning_rate {lr:g}: every trainable parameter (head, LoRA, backbone, action "
            "token), as RoboVLMs' single AdamW group"
        )
    schedule = str(obj.get("scheduler", "constant")).lower()
    if schedule == "constant":
        out.set("scheduler", "trainer.lr_schedule", "constant")
        if "scheduler" not in obj:
            out.notes.append("no scheduler: constant after warm-up (RoboVLMs' default)")
    elif schedule == "cosine":  # transformers' cosine decays to 0
        out.set("scheduler", "trainer.lr_schedule", "cosine")
        out.set("scheduler", "trainer.min_lr_scale", 0.0)
        out.notes.append("scheduler cosine: to 0 after warm-up (transformers' schedule)")
    elif schedule == "half-cosine":
        out.set("scheduler", "trainer.lr_schedule", "cosine")
        out.notes.append("scheduler half-cosine: cosine down to min_lr_scale x the rate")
    else:
        raise ConfigError(
            f"scheduler {obj.get('scheduler')!r}: RoboVLMs knows constant, cosine, half-cosine"
        )


def _normalization(obj: dict[str, Any], out: Imported) -> None:
    """``norm_action`` (top level or in train_dataset; RoboVLMs' default false): clamp to
    [norm_min, norm_max] and scale to [-1, 1]; false trains on raw actions."""
    ds = obj.get("train_dataset") if isinstance(obj.get("train_dataset"), dict) else {}
    norm = ds.get("norm_action", obj.get("norm_action", False))
    lo = float(ds.get("norm_min", obj.get("norm_min", -1.0)))
    hi = float(ds.get("norm_max", obj.get("norm_max", 1.0)))
    if norm:
        out.set("norm_action", "data.normalization", "bounds")
        out.set("norm_min", "data.norm_min", lo)
        out.set("norm_max", "data.norm_max", hi)
        out.notes.append(f"norm_action: actions clipped to [{lo:g}, {hi:g}] and scaled to [-1, 1]")
    else:
        out.set("norm_action", "data.normalization", "none")
        out.notes.append("norm_action false (RoboVLMs' default): the head regresses raw actions")
        for key in ("norm_min", "norm_max"):
            if key in obj:
                out.ignore(key, "norm_action is false")


def _model_without_vlm(obj: dict[str, Any], out: Imported) -> None:
    name = str(obj["model"]).lower()
    out.set("model", "backbone.name", _family(name, "model"))
    path = obj.get("model_path") or _hub_id(obj.get("model_url"))
    if path:
        out.set("model_path" if obj.get("model_path") else "model_url", "backbone.path", str(path))
    if obj.get("model_path") and "model_url" in obj:
        out.ignore("model_url", "model_path names the model")
    out.notes.append(f"model {obj['model']!r} without a vlm block: the {VLM_NAMES[name]} adapter")


def _hub_id(url: Any) -> str:
    text = str(url or "")
    prefix = "https://huggingface.co/"
    return text[len(prefix) :].strip("/") if text.startswith(prefix) else ""


def _vlm(value: dict[str, Any], out: Imported) -> None:
    name = str(value.get("name", "")).lower()
    if name:
        out.set("vlm.name", "backbone.name", _family(name, "vlm.name"))
    path = value.get("pretrained_model_name_or_path")
    if path:
        out.set("vlm.pretrained_model_name_or_path", "backbone.path", str(path))
    for k in value:
        if k not in ("name", "pretrained_model_name_or_path"):
            out.ignore(f"vlm.{k}")


def _trainer(value: dict[str, Any], out: Imported, source: str, top: dict[str, Any]) -> None:
    for k, v in value.items():
        if k == "precision":
            if "precision" in top or "precision" in (top.get("train_setup") or {}):
                out.ignore("trainer.precision")
            elif v is not None:
                out.set("trainer.precision", "trainer.precision", _precision(v, f"{source}: {k}"))
        elif k in TRAINER and v is not None:
            out.set(f"trainer.{k}", TRAINER[k], v if k != "strategy" else str(v))
        elif k in TRAINER:
            out.ignore(f"trainer.{k}", "null")
        else:
            out.ignore(f"trainer.{k}")


def _dataset(key: str, value: dict[str, Any], out: Imported) -> None:
    train = key == "train_dataset"
    for k, v in value.items():
        name = f"{key}.{k}"
        if k == "data_dir" and train:
            out.set(name, "data.path", str(v))
        elif k == "episode_pattern" and train:
            out.set(name, "data.pattern", str(v))
        elif k == "train_split" and train:
            val = round(1.0 - float(v), 6)
            out.set(name, "data.val_fraction", val)
            out.set(name, "data.test_fraction", 0.0)
            out.notes.append(f"train_split {v}: {val:g} of the episodes validate, none test")
        elif k == "rgb_pad" and train:
            out.set(name, "data.augment.shift_pixels", int(v))
            out.notes.append(f"rgb_pad {v}: random shifts of up to {v} px (RoboVLMs' RandomShifts)")
        elif k in ("norm_action", "norm_min", "norm_max") and train:
            pass  # with the top-level keys
        elif not train and k in ("data_dir", "episode_pattern", "train_split", "norm_action",
                                 "norm_min", "norm_max", "rgb_pad"):  # fmt: skip
            out.ignore(name, "validation episodes come from the training folder's split here")
        else:
            out.ignore(name)


def _train_setup(ts: dict[str, Any], out: Imported, source: str) -> None:
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
        elif k == "precision" and v is not None:
            out.set("train_setup.precision", "trainer.precision", _precision(v, f"{source}: {k}"))
        elif k == "predict_action":
            if not v:
                raise ConfigError(
                    "train_setup.predict_action: false trains no action head; a policy here "
                    "always predicts actions"
                )
            out.mapped.append(("train_setup.predict_action", "(the action head)"))
        elif k == "bits":
            if v not in (-1, 16, 32, None):
                raise ConfigError(f"train_setup.bits {v}: quantized training is not done here")
            out.ignore("train_setup.bits", "full-precision weights, as -1 / 16 / 32 give")
        elif k in ("predict_forward", "predict_forward_hand", "predict_caption") and v:
            out.ignore(f"train_setup.{k}", f"true, but {_AUX_LOSS}")
        else:
            out.ignore(f"train_setup.{k}")


def _act_head(head: dict[str, Any], out: Imported, top: dict[str, Any]) -> None:
    kind = str(head.get("type", "")).lower()
    if "type" in head:
        if kind not in HEAD_TYPES:
            raise ConfigError(
                f"act_head.type {head['type']!r} has no equivalent here; use one of "
                f"{sorted(set(HEAD_TYPES))}"
            )
        out.set("act_head.type", "head.type", HEAD_TYPES[kind])
    classification = kind == "mobilevlaclassificationdecoder"
    if HEAD_TYPES.get(kind, "lstm") == "lstm" and "num_layers" not in head:
        out.set("act_head.(num_layers)", "head.num_layers", LSTM_DEFAULT_LAYERS)
        out.notes.append(f"act_head without num_layers: {LSTM_DEFAULT_LAYERS} LSTM layers")
    if classification:
        _classes(head, out)
    for k, v in head.items():
        name = f"act_head.{k}"
        if k in ("type", "num_classes", "class_weights"):
            continue
        if classification and k in ("action_dim", "action_space"):
            out.ignore(name, "the classification decoder predicts (linear_x, linear_y) classes")
            continue
        if k == "hidden_size":
            out.set(name, "head.hidden_size", int(v))
        elif k == "num_layers":
            out.set(name, "head.num_layers", int(v))
        elif k == "policy_rnn_dropout_p":
            out.set(name, "head.dropout", float(v))
        elif k == "action_space":
            if v not in ("continuous", "discrete"):
                raise ConfigError(
                    f"act_head.action_space must be continuous or discrete, got {v!r}"
                )
            out.set(name, "head.action_space", v)
        elif k == "n_bin":
            out.set(name, "head.n_bins", int(v))
        elif k == "history_type":
            if v not in ("post", "pre"):
                raise ConfigError(f"act_head.history_type {v!r}: post or pre here")
            out.set(name, "backbone.history", v)
        elif k == "action_dim":
            _action_dim(int(v), out)
        elif k in ("window_size", "fwd_pred_next_n"):
            if k in top and top[k] != v:
                out.notes.append(
                    f"act_head.{k}={v} replaced by the top-level {k}={top[k]}, as RoboVLMs does"
                )
                out.ignore(name, f"overwritten by the top-level {k}")
            elif k in top:
                out.ignore(name, f"the same as the top-level {k}")
            else:
                out.set(name, f"data.{k}", int(v))
        else:
            out.ignore(name)


def _action_dim(n: int, out: Imported) -> None:
    if n in (2, 3):
        out.set("act_head.action_dim", "data.action_dims", MOBILE_DIMS[:n])
        return
    # A 7-dim config (6 arm + gripper) on a mobile base: RoboVLMs' Mobile-VLA dataset pads the
    # three velocity columns with zeros to 6 "arm" dims and makes a gripper of the key events.
    out.set("act_head.action_dim", "data.action_dims", MOBILE_DIMS)
    out.notes.append(
        f"act_head.action_dim {n} (arm + gripper) on a mobile base: the three velocity columns "
        "are predicted (RoboVLMs' Mobile-VLA loader pads them with zero arm dims and a key-event "
        "gripper, which carry nothing to learn); choose others with --data.action_dims=[...]"
    )


def _classes(head: dict[str, Any], out: Imported) -> None:
    """Mobile-VLA's classification decoder: an LSTM over the window and cross-entropy over
    the teleop keys, with optional class weights."""
    n = int(head.get("num_classes", 6))
    out.set("act_head.type", "head.action_space", "classes")
    out.set("act_head.type", "data.action_dims", MOBILE_DIMS[:2])
    if n == 6:
        keys = [[TELEOP_SPEED * x, TELEOP_SPEED * y] for x, y in SIX_CLASSES]
        out.set("act_head.num_classes", "head.action_set", keys)
        out.notes.append(
            "MobileVLAClassificationDecoder, 6 classes: Forward, Slide Left, Slide Right, Diag "
            f"Left, Diag Right, Stop at {TELEOP_SPEED} m/s (the decoder's order)"
        )
    elif n == 9:
        keys = [[TELEOP_SPEED * x, TELEOP_SPEED * y] for x, y in NINE_CLASSES]
        out.set("act_head.num_classes", "head.action_set", keys)
        out.notes.append(
            f"MobileVLAClassificationDecoder, 9 classes: {NINE_CLASS_NAMES} at {TELEOP_SPEED} m/s "
            "(the order of Mobile-VLA's inference server, which executes them)"
        )
    else:
        raise ConfigError(
            f"act_head.num_classes {n}: Mobile-VLA's decoder has 6 or 9 classes; give others as "
            "head.action_set"
        )
    weights = head.get("class_weights")
    if weights:
        if len(weights) != n:
            raise ConfigError(f"act_head.class_weights has {len(weights)} entries, expected {n}")
        out.set("act_head.class_weights", "head.class_weights", [float(w) for w in weights])


def load_robovlms(path: str | Path) -> Imported:
    path = Path(path)
    obj = _read_json(path)
    if not is_robovlms(obj):
        raise ConfigError(
            f"config file '{path}' is JSON but not a RoboVLMs config (no "
            "train_setup, act_head or vlm)"
        )
    notes: list[str] = []
    merged = resolve_parents(path, obj, notes)
    out = convert(merged, str(path))
    out.notes[:0] = notes
    if "parent" in obj:
        out.mapped.append(("parent", "(merged)") if obj["parent"] else ("parent", "(none)"))
    return out
