"""Policy server latency, measured side by side in one run.

    python bench/bench_serving.py [--requests 200] [--soak 60]

1. ``/predict`` p50 / p99 latency over loopback with window 8 on the built-in backbone
   (configs/builtin_base.yaml), history cache on (one new frame encoded per request) vs off
   (the whole window re-encoded per request), and the ratio.
2. The control step in process (the closed loop's controller: observe a frame + predict the
   chunk, no HTTP, no JPEG), history cache vs re-encoding the window, and the ratio, on one
   intra-op thread and on all cores.
3. Four concurrent sessions, each a robot at 10 Hz, for ``--soak`` seconds against the cached
   server: the share of responses under 1 s (the robot's deadline).
4. Capacity curve (``--capacity S`` seconds per point): 1-16 robots at 10 Hz, each its own
   session, against the server answering waiting requests one by one (``--max-batch 1``) and
   batched (``--max-batch 16``): per robot the achieved rate (the slowest robot's) and the p99
   latency. Target: >= 8 robots with every robot >= 9.5 Hz and p99 < 250 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import MOBILE_VLA, collect_episodes  # noqa: E402
from mobile_vla.serving.client import PredictClient, jpeg_224  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_run(tmp_path: Path) -> Path:
    """The run these benches serve: 12 collected episodes, one training step of
    configs/builtin_base.yaml (the built-in backbone, window 8)."""
    collect_episodes(tmp_path / "data", 12, workers=1)
    subprocess.run(
        [
            *MOBILE_VLA,
            "train",
            str(ROOT / "configs" / "builtin_base.yaml"),
            "-q",
            f"--data.path={tmp_path / 'data'}",
            f"--trainer.output_dir={tmp_path}",
            "--trainer.run_name=run",
            "--trainer.max_steps=1",
        ],
        check=True,
        capture_output=True,
    )
    return tmp_path / "run"


def start_server(run: Path, cache: bool, max_batch: int = 16) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mobile_vla.cli",
        "serve",
        str(run),
        "--port",
        str(port),
        "--checkpoint",
        "last",
    ]
    cmd += ["--max-batch", str(max_batch)]
    if not cache:
        cmd.append("--no-history-cache")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = PredictClient(url, timeout=2)
    deadline = time.time() + 120
    while True:
        try:
            client.health()
            return proc, url
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not start") from None
            time.sleep(0.5)


def camera_frames(n: int) -> list[bytes]:
    from mobile_vla.config import SimConfig
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.scenario import make_scenario

    cfg = SimConfig()
    with NavEnv(cfg) as env:
        obs = env.reset(make_scenario(3, "1box", "left", "medium", cfg))
        frames = [jpeg_224(obs["image"])]
        for _ in range(n - 1):
            obs, _ = env.step([0.5, 0.3, 0.0])
            frames.append(jpeg_224(obs["image"]))
    return frames


def latencies(url: str, frames: list[bytes], requests: int) -> np.ndarray:
    client = PredictClient(url, timeout=5)
    text = "Navigate around obstacles and reach the front of the beverage bottle on the left"
    for i in range(10):  # warm-up, and a full window of history
        client.predict(frames[i % len(frames)], text, "bench", reset=i == 0)
    out = []
    for i in range(requests):
        t0 = time.perf_counter()
        client.predict(frames[i % len(frames)], text, "bench")
        out.append((time.perf_counter() - t0) * 1000)
    return np.asarray(out)


def soak(
    url: str, frames: list[bytes], seconds: float, sessions: int = 4, hz: float = 10.0
) -> tuple[int, int, float]:
    text = "Navigate to the gray basket on the right"
    counts = {"total": 0, "late": 0}
    worst = [0.0]
    lock = threading.Lock()

    def robot(k: int) -> None:
        client = PredictClient(url, timeout=1.0)
        end = time.perf_counter() + seconds
        next_t = time.perf_counter()
        i = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                client.predict(frames[i % len(frames)], text, f"robot{k}", reset=i == 0)
                late = time.perf_counter() - t0 > 1.0
            except Exception:
                late = True
            with lock:
                counts["total"] += 1
                counts["late"] += late
                worst[0] = max(worst[0], time.perf_counter() - t0)
            i += 1
            next_t += 1.0 / hz
            time.sleep(max(0.0, next_t - time.perf_counter()))

    threads = [threading.Thread(target=robot, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["total"], counts["late"], worst[0]


PARTS = ("decode", "wait", "forward", "http")


def capacity(
    url: str,
    frames: list[bytes],
    robots: int,
    seconds: float,
    hz: float = 10.0,
    parts: dict[str, list[float]] | None = None,
) -> tuple[float, float, float]:
    """``robots`` sessions at ``hz`` each for ``seconds``: (slowest robot's achieved Hz,
    mean achieved Hz, p99 latency in ms). A robot sends its next frame at its next tick, or
    at once when the answer came late (as the ROS node's timer does). With ``parts``, each
    answered request's time is split (ms) into the server's JPEG decode, the wait for the
    model (the batch before it), the batched forward pass, and HTTP + JSON both ways."""
    text = "Navigate to the gray basket on the right"
    done: list[int] = [0] * robots
    lat: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5
    end = start + seconds

    def robot(k: int) -> None:
        client = PredictClient(url, timeout=1.0)
        next_t = start + k / (hz * robots)  # robots' ticks spread over a period
        i = 0
        while True:
            time.sleep(max(0.0, next_t - time.perf_counter()))
            if time.perf_counter() >= end:
                return
            t0 = time.perf_counter()
            try:
                out = client.predict(
                    frames[i % len(frames)], text, f"cap{robots}-{k}", reset=i == 0
                )
                ok = True
            except Exception:
                ok, out = False, {}
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt * 1000)
                done[k] += ok and dt <= 1.0
                if ok and parts is not None:
                    server = out["latency_ms"]
                    parts["decode"].append(out["decode_ms"])
                    parts["forward"].append(out["infer_ms"])
                    parts["wait"].append(server - out["decode_ms"] - out["infer_ms"])
                    parts["http"].append(dt * 1000 - server)
            i += 1
            next_t = max(next_t + 1.0 / hz, time.perf_counter())

    threads = [threading.Thread(target=robot, args=(k,)) for k in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rates = np.asarray(done) / seconds
    return float(rates.min()), float(rates.mean()), float(np.percentile(lat, 99))


def control_steps(run: Path, steps: int, threads: int) -> dict[bool, np.ndarray]:
    """In-process control-step latency (ms) on ``threads`` intra-op threads: PolicyController
    with and without the cache."""
    import torch

    from mobile_vla.config import SimConfig
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.scenario import make_scenario
    from mobile_vla.training.runs import load_policy

    torch.set_num_threads(threads)
    policy, cfg = load_policy(run, "last")
    sim = SimConfig()
    with NavEnv(sim) as env:
        obs = env.reset(make_scenario(3, "1box", "left", "medium", sim))
        images = [obs["image"]]
        for _ in range(29):
            obs, _ = env.step([0.5, 0.3, 0.0])
            images.append(obs["image"])
    text = "Navigate around obstacles and reach the front of the beverage bottle on the left"
    out = {}
    for cache in (True, False):
        ctl = PolicyController(policy, cfg, cache_features=cache)
        ctl.reset(None)
        times = []
        for i in range(steps + 10):
            t0 = time.perf_counter()
            ctl.observe(images[i % len(images)], text)
            ctl.chunk(text)
            if i >= 10:  # after a full window of history
                times.append((time.perf_counter() - t0) * 1000)
        out[cache] = np.asarray(times)
    return out


def print_pair(latency: dict[bool, np.ndarray]) -> None:
    """p50 / p99 with and without the history cache (ms), and their p50 ratio."""
    for cache, name in ((True, "history cache"), (False, "re-encode window")):
        lat = latency[cache]
        print(
            f"  {name:<17} p50 {np.percentile(lat, 50):7.1f} ms   p99 "
            f"{np.percentile(lat, 99):7.1f} ms"
        )
    ratio = np.percentile(latency[False], 50) / np.percentile(latency[True], 50)
    print(f"  ratio (p50, re-encode / cache): {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--soak", type=float, default=60.0)
    parser.add_argument("--capacity", type=float, default=15.0, help="seconds per point (0: off)")
    parser.add_argument(
        "--capacity-runs",
        type=int,
        default=3,
        help="runs of the batched 8-robot point, each on a fresh server (the target: all)",
    )
    parser.add_argument(
        "--only-capacity", action="store_true", help="skip the latency and soak parts"
    )
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        run = served_run(Path(tmp))
        frames = camera_frames(30)
        if args.only_capacity:
            repeat_capacity(run, frames, args)
            return
        thread_counts = sorted({1, os.cpu_count() or 1})
        steps = {n: control_steps(run, args.requests, n) for n in thread_counts}
        results = {}
        for cache in (True, False):
            proc, url = start_server(run, cache)
            try:
                results[cache] = latencies(url, frames, args.requests)
                if cache and args.soak > 0:
                    total, late, worst = soak(url, frames, args.soak)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print(
            f"/predict over loopback, built-in backbone, window 8, chunk 10, 224x224 JPEG in, "
            f"{args.requests} sequential requests after 10 warm-up:"
        )
        print_pair(results)
        for n, latency in steps.items():
            print(
                f"control step in process (observe + chunk, no HTTP), {args.requests} steps, "
                f"{n} thread{'s' if n > 1 else ''}:"
            )
            print_pair(latency)
        if args.soak > 0:
            print(
                f"4 concurrent sessions at 10 Hz for {args.soak:.0f} s: {total - late}/{total} "
                f"responses under 1 s ({(total - late) / total:.2%}); slowest "
                f"{worst * 1000:.0f} ms"
            )
        if args.capacity > 0:
            curve: dict[int, dict[int, tuple[float, float, float]]] = {}
            for max_batch in (1, 16):
                proc, url = start_server(run, True, max_batch)
                try:
                    latencies(url, frames, 20)  # warm-up
                    curve[max_batch] = {
                        n: capacity(url, frames, n, args.capacity) for n in (1, 2, 4, 8, 12, 16)
                    }
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
            print(
                f"capacity: robots at 10 Hz, {args.capacity:.0f} s per point; slowest robot's "
                "answered rate (Hz, answers within 1 s) / mean / p99 latency:"
            )
            print(f"  {'robots':>6}  {'one by one (--max-batch 1)':>30}  {'batched (16)':>30}")
            for n in curve[1]:
                row = [
                    f"{lo:5.1f} / {mean:5.1f} Hz / {p99:6.0f} ms"
                    for lo, mean, p99 in (curve[1][n], curve[16][n])
                ]
                print(f"  {n:>6}  {row[0]:>30}  {row[1]:>30}")
            for max_batch in (1, 16):
                ok = [n for n, (lo, _, p99) in curve[max_batch].items() if lo >= 9.5 and p99 < 250]
                most = max(ok) if ok else 0
                print(
                    f"  max-batch {max_batch:>2}: most robots with every robot >= 9.5 Hz and p99 "
                    f"< 250 ms: {most} (target >= 8: {'met' if most >= 8 else 'NOT met'})"
                )
        if args.capacity > 0 and args.capacity_runs > 0:
            repeat_capacity(run, frames, args)


def repeat_capacity(run: Path, frames: list[bytes], args: argparse.Namespace) -> None:
    """The target point, 8 robots against the batched server, ``--capacity-runs`` times on a
    fresh server each: each run, the spread, and where a request's time goes."""
    seconds = args.capacity if args.capacity > 0 else 15.0
    runs, parts = [], {p: [] for p in PARTS}
    for _ in range(args.capacity_runs):
        proc, url = start_server(run, True, 16)
        try:
            latencies(url, frames, 20)  # warm-up
            runs.append(capacity(url, frames, 8, seconds, parts=parts))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"8 robots at 10 Hz, batched, {seconds:.0f} s per run, {len(runs)} runs, fresh server each:"
    )
    for k, (lo, mean, p99) in enumerate(runs, 1):
        ok = lo >= 9.5 and p99 < 250
        print(
            f"  run {k}: slowest {lo:.1f} Hz, mean {mean:.1f} Hz, p99 {p99:.0f} ms "
            f"({'met' if ok else 'NOT met'})"
        )
    los, p99s = [r[0] for r in runs], [r[2] for r in runs]
    met = sum(lo >= 9.5 and p99 < 250 for lo, _, p99 in runs)
    print(
        f"  spread: slowest robot {min(los):.1f}-{max(los):.1f} Hz, p99 {min(p99s):.0f}-"
        f"{max(p99s):.0f} ms; target met in {met} of {len(runs)} runs"
    )
    total = sum(float(np.median(parts[p])) for p in PARTS)
    shares = ", ".join(
        f"{p} {np.median(parts[p]):.1f} ms ({np.median(parts[p]) / total:.0%})" for p in PARTS
    )
    print(
        f"  where a request's time goes (medians over {len(parts['forward'])} requests): {shares}"
    )


if __name__ == "__main__":
    main()
