"""What the benchmarks share: the machine line and simulated episodes to train on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOBILE_VLA = [sys.executable, "-m", "mobile_vla.cli"]


def machine() -> str:
    return f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def collect_episodes(out: Path, episodes: int, size: int = 96, workers: int = 2) -> Path:
    """``mobile-vla collect`` of ``episodes`` simulated episodes at ``size`` x ``size``."""
    subprocess.run(
        [
            *MOBILE_VLA,
            "collect",
            "--out",
            str(out),
            "--episodes",
            str(episodes),
            "--workers",
            str(workers),
            "-q",
            f"--sim.image_size=[{size},{size}]",
        ],
        check=True,
        capture_output=True,
    )
    return out
