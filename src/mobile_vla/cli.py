"""The ``mobile-vla`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla import __version__
from mobile_vla.config import Config, load_config
from mobile_vla.errors import MobileVLAError

log = logging.getLogger("mobile_vla")


# the named checkpoints of a run folder (besides step_N)
CHECKPOINTS = ("best", "last", "selected")


def quiet_lightning() -> None:
    """Lightning's tips and notices, printed twice (its own handler and the root one), and a
    deprecation warning it triggers under recent torch: not what a user needs to read."""
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # frozen backbone parts stay in eval mode on purpose (VLAPolicy.train)
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training.*"
    )


def refuse_overrides(overrides: Sequence[str], command: str) -> None:
    if overrides:
        raise MobileVLAError(
            f"{command} takes no config overrides ({' '.join(overrides)}): it uses the run's "
            "own config"
        )


def _config_from(args: argparse.Namespace, overrides: Sequence[str]) -> Config:
    return load_config(args.config, overrides)


def cmd_collect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.sim.collect import collect
    from mobile_vla.sim.scenario import parse_scenarios

    cfg = _config_from(args, overrides)
    seed = cfg.seed if args.seed is None else args.seed
    cells = parse_scenarios(args.scenarios)
    controller = None
    if args.policy is not None:
        from mobile_vla.models.runtime import PolicyController
        from mobile_vla.training.runs import load_policy

        policy, run_cfg = load_policy(args.policy, args.checkpoint)
        controller = PolicyController(policy, run_cfg)
    results = collect(
        args.out,
        args.episodes,
        cells,
        seed=seed,
        workers=args.workers,
        cfg=cfg.sim,
        progress=not args.quiet,
        controller=controller,
        expert_prob=args.expert_prob,
        start_index=args.start_index,
        counterfactual=args.counterfactual,
    )
    twins = [r for r in results if r.path.endswith("_cf.h5")]
    recorded = [r for r in results if not r.path.endswith("_cf.h5")]
    ok = sum(r.success for r in recorded)
    frames = sum(r.frames for r in recorded)
    who = "the policy" if controller is not None else "the expert"
    print(
        f"wrote {len(recorded)} episodes ({frames} frames) to {args.out}; "
        f"{who} reached the goal in {ok}/{len(recorded)}"
    )
    if twins:
        print(
            f"and {len(twins)} counterfactual twins ({sum(r.frames for r in twins)} frames: "
            "each episode's first frames, labelled for the other instruction)"
        )
    return 0


def args_collect(sub: Any) -> None:
    """The arguments of ``collect``."""
    p = sub.add_parser("collect", help="simulated expert episodes in the robot's HDF5 format")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--counterfactual",
        action="store_true",
        help="also write each episode's counterfactual twin (its first frames, left and right "
        "swapped in the instruction, labelled by the other side's expert): *_cf.h5",
    )
    p.add_argument("--episodes", required=True, type=int, help="number of episodes")
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=None,
        help="grid cells: layout/side/distance joined by _ (1box_left, 2box_far, "
        "right, ...), or 'all' (default)",
    )
    p.add_argument("--seed", type=int, default=None, help="collection seed (default: config seed)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--config", type=Path, default=None, help="YAML config (sim section)")
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="run folder: its policy drives and the expert labels each frame (DAgger)",
    )
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    p.add_argument(
        "--expert-prob",
        type=float,
        default=0.0,
        help="with --policy: probability that a step executes the expert's command",
    )
    p.add_argument("--start-index", type=int, default=0, help="number the files from here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect)


def cmd_dagger(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.sim.scenario import parse_scenarios
    from mobile_vla.training.dagger import dagger

    cfg = _config_from(args, overrides)

    def report(r) -> None:
        who = "existing episodes" if r.driven_by == "data" else r.driven_by
        reached = "" if r.driven_by == "data" else f", goal reached {r.goal_reached}/{r.episodes}"
        print(
            f"round {r.round}: {r.episodes} episodes ({who}{reached}); trained {r.run} "
            f"({r.train_steps} steps, {r.train_wall_s:.0f} s)"
        )

    dagger(
        cfg,
        args.data,
        args.rounds,
        args.episodes,
        parse_scenarios(args.scenarios),
        seed=cfg.seed if args.seed is None else args.seed,
        expert_prob=args.expert_prob,
        workers=args.workers,
        progress=not args.quiet,
        on_round=report,
    )
    return 0


def args_dagger(sub: Any) -> None:
    """The arguments of ``dagger``."""
    p = sub.add_parser(
        "dagger",
        help="expert episodes, then rounds where the policy drives and the expert corrects",
    )
    p.add_argument("config", type=Path, help="YAML config of the policy to train")
    p.add_argument("--data", required=True, type=Path, help="episode folder (grows each round)")
    p.add_argument("--rounds", type=int, default=3, help="correction rounds after round 0")
    p.add_argument("--episodes", type=int, default=240, help="episodes collected per round")
    p.add_argument("--scenarios", nargs="+", default=None, help="grid cells (as for collect)")
    p.add_argument("--seed", type=int, default=None, help="scene seed of round 0 (+r per round)")
    p.add_argument("--expert-prob", type=float, default=0.0, help="as for collect")
    p.add_argument("--workers", type=int, default=1, help="worker processes for round 0")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_dagger)


def cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.data.episodes import scan_episodes
    from mobile_vla.data.inspect import DatasetSummary

    cfg = _config_from(args, overrides)
    data = cfg.data
    scan = scan_episodes(
        args.data,
        args.pattern or data.pattern,
        data.action_names,
        data.instruction_template,
        deep=args.deep,
        progress=not args.quiet,
    )
    summary = DatasetSummary(scan, data.action_names, data.channel_order)
    if not scan.episodes and not scan.bad:
        raise MobileVLAError(
            f"no files matching '{args.pattern or data.pattern}' in dataset folder '{args.data}'"
        )
    print(json.dumps(summary.to_json(), indent=2) if args.json else summary.to_text())
    if args.sheet is not None and scan.episodes:
        from mobile_vla.data.inspect import contact_sheet

        path = contact_sheet(scan.episodes, args.sheet, data.image_size, data.channel_order)
        print(f"contact sheet (first, middle, last frame as the model sees them): {path}")
    return 1 if scan.bad else 0


def args_inspect(sub: Any) -> None:
    """The arguments of ``inspect``."""
    p = sub.add_parser("inspect", help="validate a dataset folder and print its statistics")
    p.add_argument("data", type=Path, help="folder of episode files")
    p.add_argument("--pattern", default=None, help="glob pattern (default: data.pattern)")
    p.add_argument("--deep", action="store_true", help="decode every frame of every file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--sheet", type=Path, default=None, help="write a PNG of frames as the model sees them"
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (data section)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inspect)


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.training.run import train
    from mobile_vla.training.runs import Run

    if args.resume is not None:
        run = Run.open(args.resume, list(overrides))
        out = train(run.config, resume=run.path, progress=not args.quiet)
    else:
        if args.config is None:
            raise MobileVLAError("train needs a CONFIG file (or --resume RUN)")
        out = train(load_config(args.config, overrides), progress=not args.quiet)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # under DDP every process returns here
        print(f"run folder: {out}")
    return 0


def args_train(sub: Any) -> None:
    """The arguments of ``train``."""
    p = sub.add_parser("train", help="train a policy; creates a run folder")
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML config")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN",
        help="continue RUN from checkpoints/last (same step, schedule, RNG)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.evaluation.run_eval import evaluate

    refuse_overrides(overrides, "eval")
    run, episodes, seed, chunk = closed_loop_args(args)
    evaluate(
        run,
        args.checkpoint,
        episodes,
        seed,
        chunk,
        videos=args.videos,
        batch_size=args.batch_size,
        expert_steps=args.expert_steps,
        progress=not args.quiet,
        language=args.language,
    )
    return 0


def args_eval(sub: Any) -> None:
    """The arguments of ``eval``."""
    p = sub.add_parser(
        "eval", help="offline metrics on the run's test episodes; closed loop with --episodes"
    )
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument(
        "--checkpoint",
        type=checkpoint_name,
        default="best",
        help="best (validation loss), last, selected (curve --select: closed-loop success on "
        "validation scenes) or step_N (trainer.checkpoint_steps)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--episodes",
        type=int,
        default=0,
        help="closed-loop episodes in the simulator (0 = offline metrics only)",
    )
    add_chunk_arguments(p)
    p.add_argument("--videos", type=int, default=2, help="rollout GIFs to save")
    p.add_argument(
        "--expert-steps",
        type=int,
        default=0,
        help="diagnostic: the expert drives the first N steps (side chosen), then the policy",
    )
    p.add_argument(
        "--language",
        type=int,
        default=0,
        metavar="SCENES",
        help="language reliance on SCENES held-out scenes: each driven with its instruction, "
        "left/right swapped, blank and in an unseen phrasing (4 runs a scene)",
    )
    p.add_argument("--seed", type=int, default=None, help="closed-loop seed (default: config)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_curve(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.evaluation.curve import evaluate_curve, format_curve

    refuse_overrides(overrides, "curve")
    if args.episodes < 1:
        raise MobileVLAError(f"--episodes must be >= 1 for a curve, got {args.episodes}")
    c = evaluate_curve(*closed_loop_args(args), progress=not args.quiet)
    print(format_curve(c))
    if args.select:
        from mobile_vla.evaluation.curve import select_checkpoint

        info = select_checkpoint(args.run, c)
        print(
            f"selected {info['checkpoint']} (step {info['step']}: {info['successes']}/"
            f"{info['episodes']} on seed {info['seed']}) -> {args.run}/checkpoints/selected; "
            f"report it on other seeds: mobile-vla eval {args.run} --checkpoint selected "
            f"--episodes {info['episodes']} --seed S"
        )
    return 0


def args_curve(sub: Any) -> None:
    """The arguments of ``curve``."""
    p = sub.add_parser(
        "curve",
        help="closed-loop success of every checkpoint of a run (trainer.checkpoint_steps) "
        "against training steps",
    )
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--episodes", type=int, default=48, help="held-out episodes per checkpoint")
    add_chunk_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="closed-loop seed (default: config)")
    p.add_argument(
        "--select",
        action="store_true",
        help="copy the checkpoint that drove best on these scenes to checkpoints/selected "
        "(these scenes become its validation set: eval refuses this seed for it)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_curve)


def cmd_export_lerobot(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.data.lerobot import export_lerobot

    refuse_overrides(overrides, "export-lerobot")
    info = export_lerobot(
        args.data, args.out, args.pattern, args.fps, args.codec, args.channel_order
    )
    print(
        f"wrote a LeRobot {info['codebase_version']} dataset to {args.out}: "
        f"{info['total_episodes']} episodes, {info['total_frames']} frames, "
        f"{info['total_tasks']} tasks"
    )
    return 0


def args_export_lerobot(sub: Any) -> None:
    """The arguments of ``export-lerobot``."""
    p = sub.add_parser("export-lerobot", help="write HDF5 episodes as a LeRobot v3.0 dataset")
    p.add_argument("data", type=Path, help="folder of HDF5 episodes")
    p.add_argument("out", type=Path, help="new LeRobot dataset folder")
    p.add_argument("--pattern", default="episode_*.h5", help="glob of the episode files")
    p.add_argument("--fps", type=int, default=10, help="control rate of the recordings")
    p.add_argument("--codec", choices=["libx264", "libsvtav1"], default="libx264")
    p.add_argument(
        "--channel-order",
        choices=["auto", "rgb", "bgr"],
        default="auto",
        help="how the files store frames (as data.channel_order); the video is RGB",
    )
    p.set_defaults(func=cmd_export_lerobot)


def cmd_import_lerobot(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.data.lerobot import import_lerobot

    refuse_overrides(overrides, "import-lerobot")
    written = import_lerobot(args.dataset, args.out, camera=args.camera, action_key=args.action)
    print(f"wrote {len(written)} HDF5 episodes to {args.out}")
    return 0


def args_import_lerobot(sub: Any) -> None:
    """The arguments of ``import-lerobot``."""
    p = sub.add_parser("import-lerobot", help="write a LeRobot dataset as HDF5 episodes")
    p.add_argument("dataset", type=Path, help="LeRobot dataset folder (v3.0 or v2.x)")
    p.add_argument("out", type=Path, help="folder for the HDF5 episodes")
    p.add_argument("--camera", default=None, help="video/image feature (default: the first)")
    p.add_argument("--action", default="action", help="the action feature (3 values)")
    p.set_defaults(func=cmd_import_lerobot)


def cmd_import_config(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.config import config_to_yaml
    from mobile_vla.io import atomic_write_text
    from mobile_vla.robovlms import load_robovlms

    imported = load_robovlms(args.config)
    cfg = load_config(args.config, overrides)  # validates the converted keys
    header = "".join(
        f"# {line}\n"
        for line in (
            f"converted from the RoboVLMs config {args.config}",
            *imported.summary().splitlines(),
        )
    )
    if args.out is None:
        print(header + config_to_yaml(cfg))
    else:
        if args.out.exists() and not args.force:
            raise MobileVLAError(f"'{args.out}' exists; pass --force to replace it")
        atomic_write_text(args.out, header + config_to_yaml(cfg))
        print(imported.summary())
        print(f"wrote {args.out}")
    return 0


def args_import_config(sub: Any) -> None:
    """The arguments of ``import-config``."""
    p = sub.add_parser("import-config", help="convert a RoboVLMs JSON config to YAML")
    p.add_argument("config", type=Path, help="RoboVLMs JSON config")
    p.add_argument("--out", type=Path, default=None, help="YAML to write (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_import_config)


def serve_api_key(args: argparse.Namespace) -> str:
    """The server's key from --api-key-file, MOBILE_VLA_API_KEY or --api-key (visible in ps),
    in that order; a key that is given but empty is refused, never read as 'no key'."""
    import os

    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise MobileVLAError(f"--api-key-file '{args.api_key_file}': {exc}") from None
        source = f"--api-key-file '{args.api_key_file}'"
    elif "MOBILE_VLA_API_KEY" in os.environ:
        key, source = os.environ["MOBILE_VLA_API_KEY"].strip(), "MOBILE_VLA_API_KEY"
    elif args.api_key is not None:
        key, source = args.api_key.strip(), "--api-key"
    else:
        return ""
    if not key:
        raise MobileVLAError(f"{source} gives an empty API key; give a key or leave it out")
    return key


def cmd_serve(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.serving.server import ServeSettings, load_engine, serve

    refuse_overrides(overrides, "serve")
    key = serve_api_key(args)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not key and not loopback and not args.insecure:
        raise MobileVLAError(
            f"--host {args.host} makes the server reachable from other machines without a key; "
            "give one (--api-key-file FILE or the MOBILE_VLA_API_KEY environment variable) or "
            "pass --insecure"
        )
    if not key and not loopback:
        print(f"warning: serving on {args.host} without an API key (--insecure)", file=sys.stderr)
    for flag, value in (
        ("--body-timeout", args.body_timeout),
        ("--header-timeout", args.header_timeout),
    ):
        if not value > 0:
            raise MobileVLAError(f"{flag} must be a number of seconds > 0, got {value}")
    settings = ServeSettings(
        api_key=key,
        max_body_bytes=args.max_body,
        max_image_side=args.max_image_side,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        max_batch=args.max_batch,
        session_ttl_s=args.session_ttl,
        chunk=chunk_spec(args),
        history_cache=not args.no_history_cache,
        openpi_image_key=args.openpi_image_key,
        openpi_prompt_key=args.openpi_prompt_key,
    )
    engine = load_engine(args.run, settings, device=args.device, which=args.checkpoint)
    print(
        f"serving {args.run} on http://{args.host}:{args.port} (POST /predict, POST /reset, "
        f"GET /health, WebSocket /stream; openpi's WebSocket protocol at ws://{args.host}:"
        f"{args.port} reading '{args.openpi_image_key}' and '{args.openpi_prompt_key}')"
    )
    serve(engine, args.host, args.port)
    return 0


def args_serve(sub: Any) -> None:
    """The arguments of ``serve``."""
    p = sub.add_parser("serve", help="serve a run's policy to the robot (HTTP + WebSocket)")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this X-API-Key (visible in ps: prefer --api-key-file or MOBILE_VLA_API_KEY)",
    )
    p.add_argument("--api-key-file", type=Path, default=None, help="file holding the key")
    p.add_argument(
        "--max-image-side", type=int, default=1024, help="largest image side accepted (pixels)"
    )
    p.add_argument(
        "--body-timeout", type=float, default=10.0, help="seconds to receive a request body"
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds to receive a request's line and headers (then 408, connection closed)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most waiting requests (of different sessions) answered by one forward pass",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    add_chunk_arguments(p)
    p.add_argument("--session-ttl", type=float, default=300.0, help="idle seconds per session")
    p.add_argument("--max-body", type=int, default=8 * 1024 * 1024, help="request size limit")
    p.add_argument(
        "--no-history-cache",
        action="store_true",
        help="re-encode the whole window every request (for comparison)",
    )
    p.add_argument(
        "--openpi-image-key",
        default="observation/image",
        help="the key of the camera frame in an openpi client's observation (a/b: nested)",
    )
    p.add_argument(
        "--openpi-prompt-key",
        default="prompt",
        help="the key of the instruction in an openpi client's observation",
    )
    p.set_defaults(func=cmd_serve)


def cmd_drive_sim(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.config import SimConfig, from_dict
    from mobile_vla.evaluation.closed_loop import closed_loop, format_closed_loop
    from mobile_vla.serving.client import PredictClient, RemoteController

    client = PredictClient(args.server, args.api_key or "", timeout=args.timeout)
    health = client.health()
    if args.config is not None or overrides:
        sim = load_config(args.config, overrides).sim
    else:  # the served run's own simulator settings
        sim = from_dict(SimConfig, health.get("sim", {}), "sim")
    seed = 0 if args.seed is None else args.seed
    controller: Any
    queued = args.execution == "queue"
    if queued:
        controller = queue_controller(args, client, health, sim.control_hz)
    else:
        controller = RemoteController(client, pace_hz=args.pace)
    summary, results = closed_loop(controller, sim, args.episodes, seed, progress=not args.quiet)
    execution = execution_report(controller) if queued else {}
    summary = summary.with_settings(
        chunk_mode="robot queue" if queued else health.get("chunk_mode", "?"),
        seed=seed,
        step_limit=sim.max_steps,
        episodes_detail=[r.to_json() for r in results],
    )
    print(format_closed_loop(summary).replace("closed loop", "closed loop through the server", 1))
    if queued:
        print(
            "  robot queue ({mode}): delay {delay_ms:g} ms, silent after {silent_after_s} s, "
            "deadman {deadman_s} s: longest time without a fresh action {longest_gap_s:.2f} s; "
            "ticks fresh {fresh}, held {held}, stopped {stopped}; moving past the deadman {over}; "
            "stale actions dropped {stale_dropped}; {requests} requests".format(
                **execution,
                over=execution["over_deadman_moving"],
                mode="every frame" if execution["every_frame"] else "refill only",
            )
        )
    else:
        lat = np.asarray(controller.latencies_ms)
        print(
            f"  request latency: p50 {np.percentile(lat, 50):.1f} ms, p99 "
            f"{np.percentile(lat, 99):.1f} ms over {len(lat)} requests"
        )
    if args.out is not None:
        from mobile_vla.io import atomic_write_json

        extra = (
            {"execution": execution}
            if queued
            else {
                "latency_ms_p50": float(np.percentile(lat, 50)),
                "latency_ms_p99": float(np.percentile(lat, 99)),
            }
        )
        atomic_write_json(args.out, {**summary.to_json(), **extra})
    return 0


def queue_controller(args: argparse.Namespace, client: Any, health: dict, hz: float) -> Any:
    """drive-sim's robot-side queue, with the network's delay simulated on the control clock."""
    from mobile_vla.serving.execution import DelayedQueueController, ExecutionSettings

    settings = ExecutionSettings(
        dt=1.0 / hz,
        refill_below=args.refill_below or int(health.get("chunk_length", 1)),
        blend=args.blend,
        deadman_s=args.deadman if args.deadman > 0 else float("inf"),
        every_frame=not args.refill_only,
        max_in_flight=args.max_in_flight,
    )
    settings.validate()
    if args.delay_ms < 0:
        raise MobileVLAError(f"--delay-ms must be >= 0, got {args.delay_ms}")
    return DelayedQueueController(
        client.predict_timed,
        health.get("predicted_dims", ["linear_x", "linear_y"]),
        settings,
        delay_s=args.delay_ms / 1000.0,
        silent_after_s=args.silent_after if args.silent_after >= 0 else float("inf"),
        deadman_check=0.5 if args.deadman <= 0 else args.deadman,
    )


def execution_report(controller: Any) -> dict[str, Any]:
    """The queue's settings, its tick counts over all episodes, and the longest gap in any."""
    episodes = controller.episodes
    out: dict[str, Any] = {
        k: int(sum(getattr(e, k) for e in episodes))
        for k in ("fresh", "held", "stopped", "stale_dropped", "requests", "over_deadman_moving")
    }
    out["longest_gap_s"] = float(max((e.longest_gap_s for e in episodes), default=0.0))
    silent = controller.silent_after_s
    out.update(
        delay_ms=controller.delay_s * 1000.0,
        silent_after_s=None if silent == float("inf") else silent,
        deadman_s=None if controller.s.deadman_s == float("inf") else controller.s.deadman_s,
        refill_below=controller.s.refill_below,
        blend=controller.s.blend,
        every_frame=controller.s.every_frame,
    )
    return out


def args_drive_sim(sub: Any) -> None:
    """The arguments of ``drive-sim``."""
    p = sub.add_parser("drive-sim", help="drive the simulator through a policy server")
    p.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--pace",
        type=float,
        default=0.0,
        help="control rate in Hz (0 = as fast as the server answers)",
    )
    p.add_argument("--timeout", type=float, default=1.0, help="seconds the robot waits")
    p.add_argument(
        "--config", type=Path, default=None, help="sim settings (default: the served run's)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument(
        "--execution",
        choices=["sync", "queue"],
        default="sync",
        help="sync: send each frame and wait (the robot node); queue: the robot-side action "
        "queue (refill, blending, stale actions dropped, deadman) with a simulated delay",
    )
    p.add_argument(
        "--delay-ms", type=float, default=0.0, help="queue: network delay on the control clock"
    )
    p.add_argument(
        "--silent-after",
        type=float,
        default=-1.0,
        help="queue: the server stops answering after this many seconds of an episode",
    )
    p.add_argument(
        "--refill-below",
        type=int,
        default=0,
        help="queue: ask for a chunk below this many queued actions (0: the chunk length)",
    )
    p.add_argument(
        "--blend", type=float, default=0.7, help="queue: weight of the newer chunk on overlap"
    )
    p.add_argument(
        "--refill-only",
        action="store_true",
        help="queue: send a frame only when the queue runs low (default: every frame, which "
        "the server's history needs)",
    )
    p.add_argument(
        "--max-in-flight", type=int, default=8, help="queue: requests outstanding at once"
    )
    p.add_argument(
        "--deadman",
        type=float,
        default=0.5,
        help="queue: stop after this many seconds without a fresh action (0: off)",
    )
    p.set_defaults(func=cmd_drive_sim)


def cmd_compare(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.analysis.compare import compare_runs

    refuse_overrides(overrides, "compare")
    out = args.out or Path(args.run_a).parent / (
        f"compare_{Path(args.run_a).name}_vs_{Path(args.run_b).name}"
    )
    r = compare_runs(args.run_a, args.run_b, out, data=args.data, samples=args.samples)
    c, lat = r["context"], r["latent"]
    cos = c["cosine"].get("mean") if isinstance(c["cosine"], dict) else None
    print(
        f"compared {r['run_a']} ({r['strategy_a']}) and {r['run_b']} ({r['strategy_b']}) on "
        f"{r['inputs']['samples']} windows: context CKA {c['cka']:.4f}"
        + (f", cosine {cos:.4f}" if cos is not None else "")
        + f"; latent CKA {lat['cka']:.4f}"
    )
    print(f"wrote {out / 'compare.html'}, compare.json, pca.png, tsne.png")
    return 0


def args_compare(sub: Any) -> None:
    """The arguments of ``compare``."""
    p = sub.add_parser("compare", help="compare two runs' representations on the same inputs")
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="episode folder (default: run A's validation episodes)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--samples", type=int, default=256, help="windows to compare")
    p.set_defaults(func=cmd_compare)


def cmd_pretrain(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.pretraining.config import PretrainConfig
    from mobile_vla.pretraining.train import pretrain

    extra = [f"--data={args.data}"] if args.data is not None else []
    if args.resume:
        if args.config is not None or overrides or extra:
            raise MobileVLAError(
                "pretrain --resume takes no config, --data or overrides: it uses the run's own"
            )
        cfg = load_config(args.out / "config.yaml", cls=PretrainConfig)
    else:
        cfg = load_config(args.config, [*extra, *overrides], cls=PretrainConfig)
        if not cfg.data:
            raise MobileVLAError("pretrain needs a corpus: --data DIR (or 'data:' in the config)")
    command = " ".join(
        ["mobile-vla pretrain", *(sys.argv[2:] if sys.argv[1:2] == ["pretrain"] else [])]
    )
    out = pretrain(
        cfg,
        args.out,
        resume=args.resume,
        progress=not args.quiet,
        command=command,
        heads_from=args.heads_from,
    )
    m = json.loads((out / "metrics.json").read_text())["summary"]
    print(format_pretrain_metrics(m))
    print(f"wrote {out / 'export'} (weights, model card)")
    return 0


def args_pretrain(sub: Any) -> None:
    """The arguments of ``pretrain``."""
    p = sub.add_parser(
        "pretrain", help="vision-language pretraining of the built-in backbone on a corpus"
    )
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML PretrainConfig")
    p.add_argument("--data", type=Path, default=None, help="caption corpus folder")
    p.add_argument("--out", type=Path, required=True, help="pretraining run folder")
    p.add_argument("--resume", action="store_true", help="continue --out from checkpoints/last")
    p.add_argument(
        "--heads-from",
        type=Path,
        default=None,
        metavar="RUN",
        help="redo only the second phase, from RUN's checkpoints/phase1 (the config may differ "
        "in second-phase keys only)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pretrain)


def format_pretrain_metrics(m: dict) -> str:
    def both(key: str) -> str:
        itm = m.get(f"{key}_itm")
        return f"ITC {m[f'{key}_itc']:.3f}  " + (
            f"ITM {itm:.3f}" if itm is not None else "(ITM not trained)"
        )

    lines = [
        f"held-out retrieval among {m['candidates']} ({m['retrieval_images']} images, "
        f"chance R@1 {m['chance_r1']:.3f}): R@1 {both('r1')};  R@5 {both('r5')}",
        f"left/right probe ({m['probe_scenes']} scenes): {both('left_right')}",
    ]
    if "left_right_held_out_itc" in m:  # metrics written before this probe existed lack it
        lines.append(f"left/right probe, held-out phrasing: {both('left_right_held_out')}")
    lines += [
        f"colour accuracy ({m['colour_objects']} objects): {both('colour')}",
        f"object-type accuracy ({m['shape_objects']} objects): {both('shape')}",
    ]
    return "\n".join(lines)


def cmd_pretrain_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.io import atomic_write_json
    from mobile_vla.pretraining.corpus import load_corpus
    from mobile_vla.pretraining.evaluate import evaluate
    from mobile_vla.pretraining.train import load_run

    refuse_overrides(overrides, "pretrain-eval")
    if (args.run is None) == (args.weights is None):
        raise MobileVLAError("pretrain-eval takes a run folder or --weights FILE (one of them)")
    if args.run is not None:
        model, cfg, _ = load_run(args.run)
        data = args.data or cfg.data
    else:
        from mobile_vla.pretraining.config import PretrainConfig
        from mobile_vla.pretraining.train import load_weights_file

        if args.data is None:
            raise MobileVLAError("pretrain-eval --weights needs --data CORPUS")
        from mobile_vla.pretraining.weights import read_card

        model = load_weights_file(args.weights)
        made = read_card(args.weights).get("pretrain_config", {})  # was the match head trained?
        cfg = PretrainConfig(
            itm_weight=float(made.get("itm_weight", 1.0)),
            itm_images=int(made.get("itm_images", PretrainConfig.itm_images)),
        )
        data = args.data
    metrics = evaluate(model, load_corpus(data), cfg, args.limit, progress=not args.quiet)
    if args.run is not None and args.limit is None and args.data is None:
        atomic_write_json(args.run / "metrics.json", metrics)
    print(format_pretrain_metrics(metrics["summary"]))
    return 0


def args_pretrain_eval(sub: Any) -> None:
    """The arguments of ``pretrain-eval``."""
    p = sub.add_parser(
        "pretrain-eval", help="retrieval and probes of a pretraining run or a weights file"
    )
    p.add_argument("run", type=Path, nargs="?", default=None, help="pretraining run folder")
    p.add_argument(
        "--weights", type=Path, default=None, help="an exported .safetensors (e.g. the shipped)"
    )
    p.add_argument("--data", type=Path, default=None, help="corpus (default: the run's)")
    p.add_argument("--limit", type=int, default=None, help="held-out images (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain_eval)


def cmd_study(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.study.grid import Study

    study = Study(args.config, [o.removeprefix("--") for o in overrides], progress=not args.quiet)
    if args.report_only:
        from mobile_vla.study.report import write_report

        results = study.load_results()
        if not results.cells:
            raise MobileVLAError(f"study folder '{study.out}' has no finished cells yet")
        write_report(study.out, results)
    else:
        study.run()
    print((study.out / "report.md").read_text().split("## What the study says")[0].strip())
    print(f"\nreport: {study.out / 'report.html'}")
    return 0


def args_study(sub: Any) -> None:
    """The arguments of ``study``."""
    p = sub.add_parser(
        "study", help="strategies x seeds x data sizes x pretraining: train, evaluate, report"
    )
    p.add_argument("config", type=Path, help="study YAML (configs/study_quick.yaml, ...)")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the report from results.json"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only the final table")
    p.set_defaults(func=cmd_study)


def cmd_pretrain_data(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from mobile_vla.pretraining.corpus import build_corpus, load_corpus

    refuse_overrides(overrides, "pretrain-data")
    command = " ".join(
        [
            "mobile-vla pretrain-data",
            "--out",
            str(args.out),
            "--images",
            str(args.images),
            "--seed",
            str(args.seed),
            "--image-size",
            str(args.image_size),
            "--captions",
            str(args.captions),
            "--val-fraction",
            str(args.val_fraction),
        ]
    )
    out = build_corpus(
        args.out,
        args.images,
        args.seed,
        args.image_size,
        args.captions,
        args.val_fraction,
        args.workers,
        progress=not args.quiet,
        command=command,
    )
    m = load_corpus(out).manifest
    print(
        f"wrote {m['images']} images ({m['splits']['train']} train, {m['splits']['val']} "
        f"held-out) with {m['captions_per_image']} captions each to {out}; "
        f"{m['probes']} scenes have a left/right probe"
    )
    return 0


def args_pretrain_data(sub: Any) -> None:
    """The arguments of ``pretrain-data``."""
    p = sub.add_parser("pretrain-data", help="render an image-caption corpus for pretraining")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--captions", type=int, default=5, help="training captions per image")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out scenes")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain_data)


def checkpoint_name(text: str) -> str:
    """best, last, selected or step_N."""
    if text in CHECKPOINTS or (text.startswith("step_") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected best, last, selected or step_N, got '{text}'")


def chunk_spec(args: argparse.Namespace) -> Any:
    """``--chunk``, ``--chunk-k`` and ``--ensemble-decay`` as one ChunkSpec."""
    from mobile_vla.models.runtime import ChunkSpec

    try:
        return ChunkSpec(args.chunk, args.chunk_k, args.ensemble_decay)
    except ValueError as exc:
        raise MobileVLAError(f"--chunk / --chunk-k: {exc}") from None


def closed_loop_args(args: argparse.Namespace) -> tuple[Any, ...]:
    """(run, episodes, seed, chunk): what every closed-loop evaluation of a run folder takes
    first."""
    return (args.run, args.episodes, args.seed, chunk_spec(args))


def add_chunk_arguments(p: argparse.ArgumentParser) -> None:
    """How a predicted action chunk is executed (closed loop and serving)."""
    p.add_argument(
        "--chunk",
        choices=["first", "first_k", "ensemble"],
        default="first",
        help="execute the first action, the first k, or temporally ensemble chunks",
    )
    p.add_argument("--chunk-k", type=int, default=1, help="actions executed per chunk (first_k)")
    p.add_argument(
        "--ensemble-decay",
        type=float,
        default=0.1,
        help="temporal ensembling weight exp(-m * i), i = 0 for the oldest chunk",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobile-vla",
        description="Turn a pretrained VLM into a VLA policy for a mobile robot.",
        epilog="Config keys can be overridden on any command as --section.key=value.",
    )
    parser.add_argument("--version", action="version", version=f"mobile-vla {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        args_collect,
        args_dagger,
        args_inspect,
        args_train,
        args_eval,
        args_curve,
        args_pretrain_data,
        args_compare,
        args_serve,
        args_drive_sim,
        args_import_config,
        args_export_lerobot,
        args_import_lerobot,
        args_study,
        args_pretrain,
        args_pretrain_eval,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--") and "=" in r]
    stray = [r for r in rest if r not in overrides]
    if stray:
        parser.error(
            f"unrecognized arguments: {' '.join(stray)} "
            "(config overrides take the form --section.key=value)"
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose and args.command in (
        "train",
        "eval",
        "curve",
        "compare",
        "serve",
        "dagger",
    ):
        quiet_lightning()
    try:
        return int(args.func(args, overrides) or 0)
    except MobileVLAError as exc:
        print(f"mobile-vla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobile-vla {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
