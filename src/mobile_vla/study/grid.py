"""``mobile-vla study CONFIG``: a grid of strategies x seeds x training-set sizes x
pretrained-or-not, trained, evaluated offline and in closed loop, compared, and reported.

The study folder::

    study.yaml            the resolved study config
    data/                 the simulated episodes (when the study collects its own)
    cells/<cell>/         one ordinary run folder per cell (train + eval output)
    compare/<pair>/       representation comparisons (frozen vs LoRA, same seed and data)
    results.json          every finished cell and comparison, written after each one
    report.html           self-contained (images embedded), report.md, figures/*.png

Each cell runs ``mobile-vla train`` and then ``mobile-vla eval`` in one child process (its peak
memory is its own, and a crash takes one cell, not the study), forked by the study's worker,
which imported the libraries once (on Linux; elsewhere a fresh interpreter per cell). A cell
counts as finished once its entry is in ``results.json``; an interrupted cell resumes from its
last checkpoint (or restarts when it had none), so an interrupted study loses at most one epoch
of one cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mobile_vla.config import STRATEGIES, Config, bad_value, load_config, save_config, to_dict
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.io import atomic_write_json, folder_lock
from mobile_vla.study.cells import (
    CellKey,
    CellResult,
    Comparison,
    SpaceComparison,
    StudyResults,
)
from mobile_vla.study.chain import PARENT_ENV, READY
from mobile_vla.study.jobs import (
    PHASE,
    Collect,
    Compare,
    Evaluate,
    Job,
    Resume,
    Train,
    describe_all,
    to_json,
)

FORMAT = StudyResults.FORMAT
VERSION = StudyResults.VERSION


@dataclass
class StudyData:
    """The episodes every cell trains on."""

    path: str = ""
    """An existing dataset folder; empty = collect simulated episodes into <study>/data."""
    episodes: int = 120
    seed: int = 0
    image_size: list[int] = field(default_factory=lambda: [96, 96])
    workers: int = 2
    split_seed: int = 0
    """One validation split for every cell (seed, size and strategy alike)."""
    counterfactual: bool = False
    """Collect each episode's counterfactual twin too (``collect --counterfactual``); cells use
    them unless ``data.counterfactual=false`` is among their overrides."""


@dataclass
class StudyClosedLoop:
    episodes: int = 24
    """Closed-loop episodes per cell on held-out simulator seeds (0 = offline only)."""
    seed: int = 1000
    """The same held-out scenarios for every cell."""
    chunk: Literal["first", "first_k", "ensemble"] = "first"
    chunk_k: int = 1
    videos: int = 0
    curve_steps: list[int] = field(default_factory=list)
    """Keep checkpoints after these steps in every cell (``trainer.checkpoint_steps``) and
    drive each through the same scenes: success-vs-steps curves in the report."""
    language_scenes: int = 0
    """Language reliance on this many held-out scenes of the same seed per cell (each driven
    four times: instructed, left/right swapped, blank, unseen phrasing); 0 = not measured."""


@dataclass
class CellFilter:
    """Cells of the grid that match every field set here (unset = any)."""

    strategy: str | None = None
    seed: int | None = None
    train_episodes: int | None = None
    pretrained: bool | None = None

    def matches(self, cell: Cell) -> bool:
        for f in fields(self):
            want = getattr(self, f.name)
            if want is not None and getattr(cell, f.name) != want:
                return False
        return True


@dataclass
class StudyConfig:
    """A study: which cells to run and how to evaluate them."""

    base: str = "builtin_base.yaml"
    """Policy config every cell starts from (relative paths: from the study config's folder,
    then from the working directory)."""
    output_dir: str = "runs/study"
    data: StudyData = field(default_factory=StudyData)
    strategies: list[str] = field(default_factory=lambda: ["frozen", "lora"])
    seeds: list[int] = field(default_factory=lambda: [0])
    train_episodes: list[int] = field(default_factory=lambda: [0])
    """Training-set sizes (episodes of the training split; 0 = all)."""
    pretrained: list[bool] = field(default_factory=lambda: [True])
    """Backbone pretrained (true), randomly initialised (false), or both."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every cell, e.g. ``trainer.max_epochs=3``."""
    strategy_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra overrides per strategy, e.g. ``lora: [train_setup.lora_lr=1e-4]``."""
    exclude: list[CellFilter] = field(default_factory=list)
    """Cells left out of the grid, e.g. ``{strategy: lora, train_episodes: 48}``: not every
    combination is worth its time."""
    closed_loop: StudyClosedLoop = field(default_factory=StudyClosedLoop)
    compare: bool = True
    """Compare frozen and LoRA representations for every (seed, size, pretrained)."""
    compare_samples: int = 256

    def validate(self, prefix: str = "") -> None:
        if not self.strategies:
            raise bad_value("strategies", "a non-empty list", self.strategies)
        for i, s in enumerate(self.strategies):
            if s not in STRATEGIES:
                raise bad_value(f"strategies[{i}]", f"one of {', '.join(STRATEGIES)}", s)
        if len(set(self.strategies)) != len(self.strategies):
            raise bad_value("strategies", "distinct names", self.strategies)
        for key in self.strategy_overrides:
            if key not in self.strategies:
                raise bad_value(
                    f"strategy_overrides.{key}", f"a strategy of the study {self.strategies}", key
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise bad_value("seeds", "a non-empty list of distinct seeds", self.seeds)
        if not self.train_episodes or any(n < 0 for n in self.train_episodes):
            raise bad_value("train_episodes", "a non-empty list of sizes >= 0", self.train_episodes)
        if not self.pretrained:
            raise bad_value("pretrained", "[true], [false] or [true, false]", self.pretrained)
        if self.closed_loop.episodes < 0:
            raise bad_value("closed_loop.episodes", ">= 0", self.closed_loop.episodes)
        if self.data.episodes < 1 and not self.data.path:
            raise bad_value("data.episodes", ">= 1 (or set data.path)", self.data.episodes)
        grid = cells(self, excluding=False)
        for i, rule in enumerate(self.exclude):
            if all(getattr(rule, f.name) is None for f in fields(rule)):
                keys = ", ".join(f.name for f in fields(rule))
                raise bad_value(f"exclude[{i}]", f"at least one of {keys}", rule)
            if not any(rule.matches(c) for c in grid):
                raise bad_value(
                    f"exclude[{i}]", "values on the grid's axes (it matches no cell)", rule
                )
        if not cells(self):
            raise bad_value("exclude", "rules that leave at least one cell", self.exclude)


@dataclass(frozen=True)
class Cell:
    strategy: str
    pretrained: bool
    train_episodes: int
    seed: int

    @property
    def id(self) -> str:
        size = f"n{self.train_episodes}" if self.train_episodes else "nall"
        return f"{self.strategy}-{'pt' if self.pretrained else 'rand'}-{size}-s{self.seed}"

    def key(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "pretrained": self.pretrained,
            "train_episodes": self.train_episodes,
            "seed": self.seed,
        }


def cells(study: StudyConfig, excluding: bool = True) -> list[Cell]:
    """The grid less the ``exclude`` rules' cells, in the order it runs: largest data first
    (the headline table is ready soonest), then pretrained before random, then seed, then
    strategy."""
    sizes = sorted(study.train_episodes, key=lambda n: (n != 0, -n))
    grid = [
        Cell(s, p, n, seed)
        for n in sizes
        for p in sorted(study.pretrained, reverse=True)
        for seed in study.seeds
        for s in study.strategies
    ]
    rules = study.exclude if excluding else []
    return [c for c in grid if not any(rule.matches(c) for rule in rules)]


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, Path]:
    path = Path(path)
    study = load_config(path, overrides or [], cls=StudyConfig)
    base = Path(study.base)
    if not base.is_absolute():
        near = path.parent / base
        base = near if near.exists() else base
    if not base.exists():
        raise ConfigError(f"config key 'base' in '{path}': policy config '{study.base}' not found")
    return study, base


#: the base config as resolved and the built-in weights' hash, beside study.yaml
FINGERPRINT = "base_fingerprint.json"


def base_fingerprint(base: Path) -> dict[str, Any]:
    """What the base config resolves to (its parents and the package defaults included) and,
    for the built-in backbone, the SHA-256 its weights' card records: the settings a cell
    inherits that study.yaml does not hold."""
    from mobile_vla.models.backbones.builtin_weights import read_card, shipped_weights

    cfg = load_config(base)
    sha = None
    if cfg.backbone.name == "builtin" and cfg.backbone.pretrained:
        weights = Path(cfg.backbone.builtin.weights) if cfg.backbone.builtin.weights else None
        try:
            sha = read_card(weights or shipped_weights()).get("sha256")
        except ConfigError:
            sha = "unreadable"
    return {"base_config": to_dict(cfg), "builtin_weights_sha256": sha}


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (at most 5 named)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out[:5]
    return [prefix.rstrip(".")] if a != b else []


def cell_config(study: StudyConfig, base: Path, cell: Cell, data: Path, cells_dir: Path) -> Config:
    """The config a cell trains: the base with the study's overrides (study.yaml's dotted
    strings, the user's words), then the cell's axes set on the fields themselves."""
    cfg = load_config(base, [*study.overrides, *study.strategy_overrides.get(cell.strategy, [])])
    cfg.train_setup.strategy = cell.strategy
    cfg.seed = cell.seed
    cfg.backbone.pretrained = cell.pretrained
    cfg.data.train_episodes = cell.train_episodes
    cfg.data.split_seed = study.data.split_seed
    cfg.data.path = str(data)
    cfg.trainer.output_dir = str(cells_dir)
    cfg.trainer.run_name = cell.id
    if study.closed_loop.curve_steps:
        cfg.trainer.checkpoint_steps = list(study.closed_loop.curve_steps)
    cfg.validate()
    return cfg


class Study:
    def __init__(
        self,
        config: str | Path,
        overrides: list[str] | None = None,
        progress: bool = True,
        fork_worker: bool = True,
    ) -> None:
        self.config_path = Path(config)
        self.study, self.base = load_study(config, overrides)
        self.out = Path(self.study.output_dir)
        self.progress = progress
        self.results_path = self.out / "results.json"
        self.fork_worker = fork_worker
        self._proc: subprocess.Popen | None = None
        # (phase, seconds) of each piece of work this invocation ran, by cell id (or
        # "collect" / "compare ..." / "report"): results.json["phases"]
        self.phases: dict[str, list[tuple[str, float]]] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    def load_results(self) -> StudyResults:
        if not self.results_path.exists():
            return StudyResults()
        try:
            results = json.loads(self.results_path.read_text())
        except json.JSONDecodeError:
            raise MobileVLAError(
                f"'{self.results_path}' is not valid JSON; move it away to start the study over"
            ) from None
        if results.get("format") != FORMAT or results.get("version") != VERSION:
            raise MobileVLAError(f"'{self.results_path}' is not a {FORMAT} v{VERSION} results file")
        return StudyResults.from_json(results)

    def save_results(self, results: StudyResults) -> None:
        atomic_write_json(self.results_path, results.to_json())

    def check_same_study(self) -> None:
        """Refuse a study folder whose finished cells came from other settings: the study's
        own keys, the base config's resolved content (not only its path) and the built-in
        backbone's weights (their SHA-256)."""
        saved = self.out / "study.yaml"
        if not saved.exists():
            return
        old = load_config(saved, cls=StudyConfig)
        keep = ("base", "data", "overrides", "strategy_overrides", "closed_loop")
        changed = [k for k in keep if to_dict(getattr(old, k)) != to_dict(getattr(self.study, k))]
        fingerprint = self.out / FINGERPRINT
        if fingerprint.exists():
            try:
                before = json.loads(fingerprint.read_text())
            except json.JSONDecodeError:
                raise MobileVLAError(
                    f"'{fingerprint}' is not valid JSON; move it away to start the study over"
                ) from None
            changed += _changed_keys(before, base_fingerprint(self.base))
        if changed:
            raise MobileVLAError(
                f"study folder '{self.out}' was made with different settings ({changed}); "
                "finished cells would not be comparable — choose another output_dir"
            )

    # -- running --------------------------------------------------------------------------
    def _worker(self) -> subprocess.Popen | None:
        """The study's worker (:mod:`mobile_vla.study.chain` ``--serve``), started on first use:
        it imports the libraries once and forks one child per cell. None where ``fork`` is not
        available or the worker did not start; cells then run as fresh processes."""
        if not self.fork_worker or not sys.platform.startswith("linux"):
            return None
        if self._proc is not None:
            return self._proc if self._proc.poll() is None else None
        log = self.out / "logs" / "worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mobile_vla.study.chain", "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=fh,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())},
            )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != READY:
            proc.kill()
            proc.wait()
            self.fork_worker = False
            self._say(f"the study worker did not start (see {log}); one process per command")
            return None
        self._proc = proc
        return proc

    def close(self) -> None:
        """Stop the worker (it exits when its input closes)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _jobs(self, jobs: Sequence[Job], log: Path) -> list[tuple[str, float]]:
        """Run ``jobs`` (a cell's train, evaluate and compare) in a process of their own (its own
        peak memory): a child forked by the study's worker, or else a fresh interpreter.
        Returns the (phase, seconds) lines the jobs wrote to ``log``."""
        with open(log, "a") as fh:
            fh.write(f"$ mobile-vla {jobs[0].describe()}\n")
            offset = fh.tell()
        serialized = [to_json(j) for j in jobs]
        worker = self._worker()
        code: int | None = None
        if worker is not None and worker.stdin is not None and worker.stdout is not None:
            request = {"log": str(Path(log).resolve()), "jobs": serialized}
            worker.stdin.write(json.dumps(request) + "\n")
            worker.stdin.flush()
            reply = worker.stdout.readline()
            if not reply:
                raise MobileVLAError(
                    f"the study worker exited while running '{describe_all(jobs)}' "
                    f"(see {self.out / 'logs' / 'worker.log'} and {log})"
                )
            code = int(json.loads(reply)["exit"])
        else:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
            cmd = [sys.executable, "-m", "mobile_vla.study.chain", json.dumps(serialized)]
            with open(log, "a") as fh:
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise MobileVLAError(
                f"'mobile-vla {describe_all(jobs)}' failed (exit {code}); see {log}: "
                + " | ".join(tail)
            )
        return read_phases(log, offset)

    def ensure_data(self) -> Path:
        d = self.study.data
        if d.path:
            return Path(d.path)
        folder = self.out / "data"
        done = folder / ".complete"
        if done.exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        self._say(f"collecting {d.episodes} simulated episodes into {folder}")
        size = (int(d.image_size[0]), int(d.image_size[1]))
        self.phases["collect"] = self._jobs(
            [Collect(str(folder), d.episodes, d.workers, d.seed, size, d.counterfactual)],
            self.out / "study.log",
        )
        done.write_text("")
        return folder

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"[study] {text}", flush=True)

    def run_cell(self, cell: Cell, data: Path, then: Sequence[Job] = ()) -> CellResult:
        """Train and evaluate one cell in one child process; ``then``: more jobs for the same
        process (the comparison with the cell's twin)."""
        cells_dir = self.out / "cells"
        run = cells_dir / cell.id
        log = self.out / "logs" / f"{cell.id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cl = self.study.closed_loop
        evaluate = Evaluate(
            str(run),
            cl.episodes,
            cl.seed,
            cl.chunk,
            cl.chunk_k,
            cl.videos,
            bool(cl.curve_steps),
            cl.language_scenes,
        )
        if (run / "checkpoints" / "last").exists() and not (run / "train_stats.json").exists():
            self._say(f"{cell.id}: resuming interrupted training")
            jobs: list[Job] = [Resume(str(run)), evaluate, *then]
        elif not (run / "train_stats.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            config = self.out / "configs" / f"{cell.id}.yaml"  # what `train` is given
            save_config(cell_config(self.study, self.base, cell, data, cells_dir), config)
            jobs = [Train(str(config)), evaluate, *then]
        else:  # trained earlier, interrupted while evaluating
            jobs = [evaluate, *then]
        self.phases[cell.id] = self._jobs(jobs, log)
        return collect_cell(run, cell)

    def compare_job(self, a: Path, b: Path, name: str) -> Compare:
        out = self.out / "compare" / name
        return Compare(str(a), str(b), str(out), self.study.compare_samples)

    def compare_result(self, a: Path, b: Path, name: str, key: dict[str, Any]) -> Comparison:
        out = self.out / "compare" / name
        result = json.loads((out / "compare.json").read_text())
        return Comparison(
            [str(a), str(b)],
            str(out),
            SpaceComparison.from_json(result["context"]),
            SpaceComparison.from_json(result["latent"]),
            result["inputs"]["samples"],
            key,
        )

    def run_compare(self, a: Path, b: Path, name: str, key: dict[str, Any]) -> Comparison:
        log = self.out / "logs" / f"compare-{name}.log"
        self.phases[f"compare {name}"] = self._jobs([self.compare_job(a, b, name)], log)
        return self.compare_result(a, b, name, key)

    def _pair(self, cell: Cell) -> tuple[str, Path, Path]:
        """The frozen-vs-LoRA comparison a cell belongs to: (name, frozen run, LoRA run)."""
        frozen = Cell("frozen", cell.pretrained, cell.train_episodes, cell.seed)
        lora = Cell("lora", cell.pretrained, cell.train_episodes, cell.seed)
        cells_dir = self.out / "cells"
        name = f"frozen-vs-lora-{lora.id.removeprefix('lora-')}"
        return name, cells_dir / frozen.id, cells_dir / lora.id

    def run(self) -> Path:
        """Run the cells not finished yet, the comparisons, and write the report."""
        # one writer per study folder: a second study on it is refused, naming the PID
        with folder_lock(self.out, "mobile-vla study", self._say):
            try:
                return self._run()
            finally:
                self.close()

    def _run(self) -> Path:
        from mobile_vla.study.report import write_report

        start = time.perf_counter()  # the total counts the collection too
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_same_study()
        results = self.load_results()
        save_config(self.study, self.out / "study.yaml")
        atomic_write_json(self.out / FINGERPRINT, base_fingerprint(self.base))
        data = self.ensure_data()
        grid = cells(self.study)
        for k, cell in enumerate(grid, 1):
            if cell.id in results.cells:
                self._say(f"[{k}/{len(grid)}] {cell.id}: finished earlier, skipped")
                continue
            t0 = time.perf_counter()
            comparing = self.study.compare and {"frozen", "lora"} <= set(self.study.strategies)
            name, frozen, lora = self._pair(cell)
            # the comparison runs in the same process as the second of the pair to finish
            twin = frozen.name if cell.strategy == "lora" else lora.name
            then = (
                [self.compare_job(frozen, lora, name)]
                if comparing
                and cell.strategy in ("frozen", "lora")
                and twin in results.cells
                and name not in results.compare
                else []
            )
            what = "training, evaluating" + (" and comparing with its twin" if then else "")
            self._say(f"[{k}/{len(grid)}] {cell.id}: {what}")
            results.cells[cell.id] = self.run_cell(cell, data, then)
            results.phases = phase_table(results.phases, self.phases, results.cells)
            if then:
                pair = {**cell.key(), "strategy": "frozen-vs-lora"}
                results.compare[name] = self.compare_result(frozen, lora, name, pair)
            self.save_results(results)
            self._say(f"[{k}/{len(grid)}] {cell.id}: done in {time.perf_counter() - t0:.0f} s")
        if self.study.compare and {"frozen", "lora"} <= set(self.study.strategies):
            ids = {c.id for c in grid}
            for cell in grid:  # comparisons not made alongside a cell (e.g. resumed studies)
                if cell.strategy != "frozen":
                    continue
                name, frozen, lora = self._pair(cell)
                if name in results.compare or lora.name not in ids:
                    continue
                self._say(f"comparing representations: {name}")
                pair = {**cell.key(), "strategy": "frozen-vs-lora"}
                results.compare[name] = self.run_compare(frozen, lora, name, pair)
                self.save_results(results)
        results.study = to_dict(self.study)
        results.base_config = str(self.base)
        t0 = time.perf_counter()
        results.phases = phase_table(results.phases, self.phases, results.cells)
        self.save_results(results)
        write_report(self.out, results)  # sets results.report
        results.phases["report"] = round(time.perf_counter() - t0, 2)
        results.wall_time_s_this_invocation = time.perf_counter() - start
        results.phases["total_this_invocation"] = round(results.wall_time_s_this_invocation, 2)
        self.save_results(results)
        self._say("where the time went:\n" + format_phases(results.phases))
        self._say(f"report: {self.out / 'report.html'} (and report.md, results.json)")
        return self.out


def phase_table(
    earlier: dict[str, Any] | None,
    now: dict[str, list[tuple[str, float]]],
    cells: dict[str, CellResult],
) -> dict[str, Any]:
    """``results.json["phases"]``: seconds of each phase — collection, and per cell its
    training (the feature cache's build and the training loop apart, from the run's
    ``train_stats.json``), evaluation, language reliance, curve and comparison — keeping what
    an earlier invocation recorded for work not redone now."""
    table: dict[str, Any] = {"collect": None, "cells": {}, "compare": {}}
    if earlier:
        table["collect"] = earlier.get("collect")
        table["cells"] = dict(earlier.get("cells", {}))
        table["compare"] = dict(earlier.get("compare", {}))
    for key, items in now.items():
        if key == "collect":
            table["collect"] = round(sum(s for _, s in items), 2)
        elif key.startswith("compare "):
            table["compare"][key.removeprefix("compare ")] = round(sum(s for _, s in items), 2)
        else:
            row: dict[str, float] = {}
            for name, secs in items:
                row[name] = round(row.get(name, 0.0) + secs, 2)
            budget = (cells[key].budget if key in cells else None) or {}
            if "train" in row:
                if budget.get("cache_s") is not None:
                    row["feature cache"] = round(float(budget["cache_s"]), 2)
                if budget.get("train_time_s") is not None:
                    row["training loop"] = round(float(budget["train_time_s"]), 2)
            if "compare" in row:
                table["compare"][key] = row.pop("compare")
            table["cells"][key] = row
    return table


def format_phases(phases: dict[str, Any]) -> str:
    """The phase table as the study prints it."""
    lines = []
    if phases.get("collect") is not None:
        lines.append(f"  collect: {phases['collect']:.0f} s")
    for cell, row in phases.get("cells", {}).items():
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in row.items())
        lines.append(f"  {cell}: {parts}")
    for name, secs in phases.get("compare", {}).items():
        lines.append(f"  compare {name}: {secs:.0f} s")
    if phases.get("report") is not None:
        lines.append(f"  report: {phases['report']:.0f} s")
    if phases.get("total_this_invocation") is not None:
        lines.append(f"  total (this invocation): {phases['total_this_invocation']:.0f} s")
    return "\n".join(lines)


def read_phases(log: Path, offset: int = 0) -> list[tuple[str, float]]:
    """The (phase, seconds) lines jobs wrote to ``log`` after byte ``offset``."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        if line.startswith(PHASE):
            try:
                item = json.loads(line[len(PHASE) :])
                out.append((str(item["phase"]), float(item["seconds"])))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def collect_cell(run: Path, cell: Cell) -> CellResult:
    """What the report needs from a finished run folder."""
    return CellResult.from_run(run, CellKey(**cell.key()))
