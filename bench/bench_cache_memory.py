"""Memory a feature-cache build leaves behind, with and without handing freed memory back.

    python bench/bench_cache_memory.py [--episodes 60]

Builds the frozen-prefix cache of the built-in backbone (configs/builtin_drive.yaml: 96x96,
24-frame episodes) for the same simulated episodes twice, each in a fresh process and a fresh
cache folder: as ``PrefixCache`` does (``malloc_trim`` after each entry) and with that call
disabled. Prints the process's anonymous memory (``RssAnon``: what the cache's memory-mapped
files are not) before and after, per entry, side by side. Without the trim, glibc keeps the
freed tensors of every build in its heap: ~8 MB per entry, 15 GiB over a 1,880-entry build,
which pushed the cache's own pages out of RAM and slowed training ~5x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, collect_episodes, machine

CHILD = r"""
import sys
from mobile_vla.config import load_config
from mobile_vla.data.dataset import build_datasets
from mobile_vla.training import feature_cache
from mobile_vla.training.runs import build_policy

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1])

data, cache, trim = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if not trim:
    feature_cache.release_freed_memory = lambda: None
cfg = load_config(
    "configs/builtin_drive.yaml",
    [f"--data.path={data}", f"--data.cache_dir={cache}", "--data.test_fraction=0"],
)
bundle = build_datasets(cfg)
policy, _ = build_policy(cfg, bundle.stats)
prefix = feature_cache.PrefixCache(cfg, policy, bundle.train.frames)
episodes = bundle.train.episodes + bundle.val.episodes
for ep in episodes:  # the frame cache first: only the prefix build is measured
    bundle.train.frames.frames(ep)
before = anon_kib()
prefix.ensure(episodes)
print(len(episodes), before, anon_kib())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=60)
    args = parser.parse_args()
    print(machine())
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux's /proc/self/status (RssAnon)")
    with tempfile.TemporaryDirectory() as tmp:
        data = collect_episodes(Path(tmp) / "data", args.episodes)
        rows = {}
        for trim in ("1", "0"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(data), f"{tmp}/cache{trim}", trim],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            n, before, after = (int(v) for v in out.stdout.split()[-3:])
            rows[trim] = (n, before, after)
        print(f"frozen-prefix cache build, built-in backbone, {args.episodes} episodes:")
        for trim, name in (("1", "malloc_trim after each entry"), ("0", "without it")):
            n, before, after = rows[trim]
            print(
                f"  {name:<30} RssAnon {before / 1024:7.1f} -> {after / 1024:7.1f} MiB: "
                f"{(after - before) / 1024 / n:5.2f} MiB per entry ({n} entries)"
            )
        grown = {t: (r[2] - r[1]) / r[0] for t, r in rows.items()}
        print(
            f"  memory kept per entry, with / without the trim: "
            f"{grown['1'] / max(grown['0'], 1e-9):.3f} (target: well under 0.1)"
        )


if __name__ == "__main__":
    main()
