"""A soak: 4 robots at 10 Hz against ``mobile-vla serve`` for a long time, minute by minute.

    python bench/bench_soak.py [--minutes 20] [--robots 4] [--episode-s 60]

Each robot is its own session and sends the robot node's request (a 224 x 224 JPEG over HTTP)
at its 10 Hz ticks; every ``--episode-s`` seconds it starts a new session (a new episode), so
the server keeps creating sessions and must drop idle ones (``--session-ttl``, 300 s). Per
minute it prints the p50 / p99 latency, the slowest robot's answered rate (answers within 1 s
per second), 5xx replies, and the server process's RSS, open file descriptors and sessions
held. It passes when, after the first (warm-up) minute, RSS grows by at most
``--rss-bound-mib`` (default 64 MiB), open descriptors by at most 8, no robot falls below
9.5 Hz in any minute, and no reply is a 5xx. A bench, not a test: it takes ``--minutes``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_serving import camera_frames, served_run, start_server  # noqa: E402
from mobile_vla.serving.client import PredictClient, ServerError  # noqa: E402


def process_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def sessions_held(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        return int(json.loads(resp.read())["sessions"])


class Minute:
    def __init__(self, robots: int) -> None:
        self.lat: list[float] = []
        self.answered = [0] * robots
        self.errors_5xx = 0
        self.other_errors = 0


def robot(
    k: int,
    url: str,
    frames: list[bytes],
    start: float,
    end: float,
    minutes: list[Minute],
    lock: threading.Lock,
    episode_s: float,
    hz: float = 10.0,
) -> None:
    client = PredictClient(url, timeout=1.0)
    text = "go around the box on the left" if k % 2 else "go around the box on the right"
    next_t = start + k / (hz * len(minutes[0].answered))
    i, episode = 0, -1
    while True:
        time.sleep(max(0.0, next_t - time.perf_counter()))
        now = time.perf_counter()
        if now >= end:
            return
        this_episode = int((now - start) // episode_s)
        new = this_episode != episode
        episode = this_episode
        t0 = time.perf_counter()
        status = 200
        try:
            client.predict(frames[i % len(frames)], text, f"soak-{k}-{episode}", reset=new)
        except ServerError as exc:
            status = exc.status
        except Exception:
            status = 0
        dt = time.perf_counter() - t0
        m = minutes[min(int((t0 - start) // 60), len(minutes) - 1)]
        with lock:
            m.lat.append(dt * 1000)
            if status == 200 and dt <= 1.0:
                m.answered[k] += 1
            elif status >= 500:
                m.errors_5xx += 1
            elif status != 200:
                m.other_errors += 1
        i += 1
        next_t = max(next_t + 1.0 / hz, time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episode-s", type=float, default=60.0)
    parser.add_argument("--rss-bound-mib", type=float, default=64.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; {args.robots} robots at 10 Hz for {args.minutes} min")
    with tempfile.TemporaryDirectory() as tmp:
        frames = camera_frames(30)
        proc, url = start_server(served_run(Path(tmp)), True, 16)
        try:
            rows = soak(proc.pid, url, frames, args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    verdict(rows, args)


def soak(pid: int, url: str, frames: list[bytes], args: argparse.Namespace) -> list[dict]:
    minutes = [Minute(args.robots) for _ in range(args.minutes)]
    lock = threading.Lock()
    start = time.perf_counter() + 1.0
    end = start + 60 * args.minutes
    threads = [
        threading.Thread(
            target=robot, args=(k, url, frames, start, end, minutes, lock, args.episode_s)
        )
        for k in range(args.robots)
    ]
    for t in threads:
        t.start()
    rows = []
    print("minute   p50 ms   p99 ms   slowest Hz   5xx   other   RSS MiB   fds   sessions")
    for minute in range(args.minutes):
        time.sleep(max(0.0, start + 60 * (minute + 1) - time.perf_counter()))
        time.sleep(1.5)  # the minute's last requests are answered
        rss, fds = process_stats(pid)
        m = minutes[minute]
        row = {
            "minute": minute + 1,
            "p50": float(np.percentile(m.lat, 50)) if m.lat else float("nan"),
            "p99": float(np.percentile(m.lat, 99)) if m.lat else float("nan"),
            "slowest_hz": min(m.answered) / 60.0,
            "5xx": m.errors_5xx,
            "other": m.other_errors,
            "rss_mib": rss,
            "fds": fds,
            "sessions": sessions_held(url),
        }
        rows.append(row)
        print(
            f"{row['minute']:>6}   {row['p50']:6.1f}   {row['p99']:6.1f}   "
            f"{row['slowest_hz']:10.2f}   {row['5xx']:>3}   {row['other']:>5}   "
            f"{row['rss_mib']:7.1f}   {row['fds']:>3}   {row['sessions']:>8}",
            flush=True,
        )
    for t in threads:
        t.join()
    return rows


def verdict(rows: list[dict], args: argparse.Namespace) -> None:
    after = rows[1:] if len(rows) > 1 else rows
    growth = max(r["rss_mib"] for r in after) - after[0]["rss_mib"]
    fd_growth = max(r["fds"] for r in after) - after[0]["fds"]
    slowest = min(r["slowest_hz"] for r in rows)
    five = sum(r["5xx"] for r in rows)
    checks = {
        f"RSS growth after minute 1 {growth:.1f} MiB <= {args.rss_bound_mib:g}": growth
        <= args.rss_bound_mib,
        f"open descriptors growth after minute 1 {fd_growth} <= 8": fd_growth <= 8,
        f"slowest robot in any minute {slowest:.2f} Hz >= 9.5": slowest >= 9.5,
        f"5xx replies {five} == 0": five == 0,
    }
    for text, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    print("soak:", "PASS" if all(checks.values()) else "FAIL")


if __name__ == "__main__":
    main()
