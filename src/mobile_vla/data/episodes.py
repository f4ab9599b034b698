"""Finding, validating and splitting the episodes of a dataset folder."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mobile_vla.config import ACTION_NAMES, DEFAULT_INSTRUCTION_TEMPLATE, DataConfig
from mobile_vla.data.hdf5 import EpisodeInfo, read_episode_info, verify_frames
from mobile_vla.errors import DataError, EpisodeError
from mobile_vla.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """Every file matched in a folder: the good episodes and one error per bad file."""

    folder: Path
    pattern: str
    episodes: list[EpisodeInfo] = field(default_factory=list)
    bad: list[EpisodeError] = field(default_factory=list)


def find_episode_files(folder: str | Path, pattern: str = "episode_*.h5") -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"dataset folder '{folder}' does not exist")
    if not folder.is_dir():
        raise DataError(f"dataset path '{folder}' is not a folder")
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def scan_episodes(
    folder: str | Path,
    pattern: str = "episode_*.h5",
    action_names: Sequence[str] = ACTION_NAMES,
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
    deep: bool = False,
    progress: bool = False,
) -> ScanResult:
    """Validate every matching file. ``deep`` decodes every frame (slow on real 720p data)."""
    files = find_episode_files(folder, pattern)
    result = ScanResult(Path(folder), pattern)
    for path in tqdm(files, desc="validate", unit="file", disable=not progress):
        try:
            info = read_episode_info(path, action_names, instruction_template)
            if deep:
                verify_frames(path)
        except EpisodeError as exc:
            result.bad.append(exc)
            continue
        result.episodes.append(info)
    return result


def load_episodes(cfg: DataConfig, progress: bool = False) -> list[EpisodeInfo]:
    """The episodes training and evaluation use.

    Bad files refuse the whole dataset (every one is listed) unless ``cfg.skip_bad`` is set,
    in which case they are reported and skipped.
    """
    scan = scan_episodes(
        cfg.path, cfg.pattern, cfg.action_names, cfg.instruction_template, progress=progress
    )
    if not scan.episodes and not scan.bad:
        raise DataError(f"no files matching '{cfg.pattern}' in dataset folder '{cfg.path}'")
    if scan.bad:
        listing = "; ".join(str(e) for e in scan.bad)
        if not cfg.skip_bad:
            raise DataError(
                f"{len(scan.bad)} bad episode file(s) in '{cfg.path}' (fix them or pass "
                f"--data.skip_bad=true): {listing}"
            )
        log.warning("skipping %d bad episode file(s) in %s: %s", len(scan.bad), cfg.path, listing)
    if not scan.episodes:
        raise DataError(f"no usable episodes in '{cfg.path}' ({len(scan.bad)} bad file(s))")
    return scan.episodes


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@dataclass
class Split:
    train: list[EpisodeInfo]
    val: list[EpisodeInfo]
    test: list[EpisodeInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        out = {"train": [e.path.name for e in self.train], "val": [e.path.name for e in self.val]}
        if self.test:
            out["test"] = [e.path.name for e in self.test]
        return out

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())


def derived_of(
    episodes: Sequence[EpisodeInfo],
) -> tuple[list[EpisodeInfo], dict[str, list[EpisodeInfo]]]:
    """The recorded episodes, and the derived ones (counterfactual relabellings) by the name
    of their source; a derived episode whose source is not in the list counts as recorded."""
    names = {ep.path.stem for ep in episodes}
    primary: list[EpisodeInfo] = []
    derived: dict[str, list[EpisodeInfo]] = defaultdict(list)
    for ep in episodes:
        if ep.source is not None and ep.source in names and ep.source != ep.path.stem:
            derived[ep.source].append(ep)
        else:
            primary.append(ep)
    return primary, derived


def with_derived(
    part: Sequence[EpisodeInfo], derived: dict[str, list[EpisodeInfo]]
) -> list[EpisodeInfo]:
    """``part`` and the episodes derived from its members, sorted by file name."""
    out = list(part)
    for ep in part:
        out.extend(derived.get(ep.path.stem, ()))
    return sorted(out, key=lambda e: e.path.name)


def split_episodes(
    episodes: Sequence[EpisodeInfo], val_fraction: float, seed: int, test_fraction: float = 0.0
) -> Split:
    """Episode-level split stratified by (scenario, side), deterministic from ``seed``.

    Each stratum gives ``round(fraction * n)`` episodes to test and to validation, at least one
    each when the fraction is > 0 and the stratum has enough, and always keeps one for
    training. The result does not depend on the order episodes are listed in; with
    ``test_fraction`` 0 it is the train/validation split of earlier versions. Derived episodes
    (counterfactual relabellings, :attr:`EpisodeInfo.source`) are not split on their own: each
    goes to its source's training or validation part (they share its frames); the test part
    keeps recorded episodes only, since test metrics describe what the robot did.
    """
    primary, derived = derived_of(episodes)
    strata: dict[str, list[EpisodeInfo]] = defaultdict(list)
    for ep in primary:
        strata[ep.stratum].append(ep)
    train: list[EpisodeInfo] = []
    val: list[EpisodeInfo] = []
    test: list[EpisodeInfo] = []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda e: e.path.name)
        rng = np.random.default_rng([seed, _stable_int(key)])
        order = rng.permutation(len(group))
        n_val = _share(val_fraction, len(group), 1)
        n_test = _share(test_fraction, len(group), 1 + n_val)
        val.extend(group[i] for i in order[:n_val])
        test.extend(group[i] for i in order[n_val : n_val + n_test])
        train.extend(group[i] for i in order[n_val + n_test :])
    test.sort(key=lambda e: e.path.name)
    return Split(with_derived(train, derived), with_derived(val, derived), test)


def _share(fraction: float, n: int, keep: int) -> int:
    """round(fraction * n), at least 1 when fraction > 0, leaving ``keep`` episodes."""
    k = round(fraction * n) if fraction > 0 else 0
    if fraction > 0 and n > keep:
        k = max(k, 1)
    return max(0, min(k, n - keep))


def train_subset(train: Sequence[EpisodeInfo], n: int, seed: int) -> list[EpisodeInfo]:
    """``n`` recorded training episodes spread over the (scenario, side) strata, with the
    episodes derived from them: each stratum is shuffled by ``seed`` and the strata are taken
    in turn, so smaller subsets are prefixes of larger ones (nested) and every stratum is
    represented as early as possible."""
    primary, derived = derived_of(train)
    if n <= 0 or n >= len(primary):
        return list(train)
    strata: dict[str, list[EpisodeInfo]] = defaultdict(list)
    for ep in primary:
        strata[ep.stratum].append(ep)
    queues = []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda e: e.path.name)
        rng = np.random.default_rng([seed, _stable_int(key), 1])
        queues.append([group[i] for i in rng.permutation(len(group))])
    order: list[EpisodeInfo] = []
    for depth in range(max(len(q) for q in queues)):
        order.extend(q[depth] for q in queues if depth < len(q))
    return with_derived(order[:n], derived)
