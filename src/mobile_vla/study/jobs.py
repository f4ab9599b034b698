"""A study's work as typed jobs, executed by calling the library (``collect``, ``train``,
the offline and closed-loop evaluations, ``compare_runs``) directly; the CLI is one more caller
of the same functions, and nothing here goes through it.

A cell is a list of jobs run in one process (its own peak memory, a crash stays in the cell):
``Train`` (or ``Resume``), then ``Evaluate``, then the ``Compare`` jobs it completes. Jobs
cross the process boundary as JSON (``to_json`` / ``from_json``); each job's log line is the
equivalent command line, so a cell's log reads like a shell session that can be replayed.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from mobile_vla.errors import MobileVLAError

#: the prefix of a phase line in a job's log (:func:`phase`)
PHASE = "[phase] "


@dataclass(frozen=True)
class Collect:
    out: str
    episodes: int
    workers: int
    seed: int
    image_size: tuple[int, int]
    counterfactual: bool = False

    def describe(self) -> str:
        h, w = self.image_size
        return (
            f"collect --out {self.out} --episodes {self.episodes} --workers {self.workers} "
            f"--seed {self.seed} --sim.image_size=[{h},{w}]"
            + (" --counterfactual" if self.counterfactual else "")
        )


@dataclass(frozen=True)
class Train:
    config: str  # the cell's resolved config file (study.grid.cell_config)

    def describe(self) -> str:
        return f"train {self.config}"


@dataclass(frozen=True)
class Resume:
    run: str

    def describe(self) -> str:
        return f"train --resume {self.run}"


@dataclass(frozen=True)
class Evaluate:
    run: str
    episodes: int = 0
    seed: int = 1000
    chunk: str = "first"
    chunk_k: int = 1
    videos: int = 0
    curve: bool = False
    language: int = 0

    def describe(self) -> str:
        text = f"eval {self.run}"
        if self.episodes:
            text += (
                f" --episodes {self.episodes} --seed {self.seed} --chunk {self.chunk} "
                f"--chunk-k {self.chunk_k} --videos {self.videos}"
            )
        if self.language:
            text += f" --language {self.language}"
            if not self.episodes:
                text += f" --seed {self.seed}"
        if self.episodes and self.curve:
            text += (
                f" then curve {self.run} --episodes {self.episodes} --seed {self.seed} "
                f"--chunk {self.chunk} --chunk-k {self.chunk_k}"
            )
        return text


@dataclass(frozen=True)
class Compare:
    run_a: str
    run_b: str
    out: str
    samples: int

    def describe(self) -> str:
        return f"compare {self.run_a} {self.run_b} --out {self.out} --samples {self.samples}"


Job = Collect | Train | Resume | Evaluate | Compare
KINDS: dict[str, type] = {k.__name__: k for k in (Collect, Train, Resume, Evaluate, Compare)}


def to_json(job: Job) -> dict[str, Any]:
    return {"kind": type(job).__name__, **asdict(job)}


def from_json(obj: dict[str, Any]) -> Job:
    kind = KINDS.get(obj.get("kind", ""))
    if kind is None:
        raise MobileVLAError(f"unknown study job kind {obj.get('kind')!r}")
    args = {f.name: obj[f.name] for f in fields(kind) if f.name in obj}
    for key in ("overrides", "image_size"):
        if key in args:
            args[key] = tuple(args[key])
    return kind(**args)


def execute(job: Job) -> None:
    """Run one job in this process, printing what the matching command prints, and a phase
    line (:func:`phase`) for each part it times."""
    if isinstance(job, Collect):
        from mobile_vla.config import SimConfig
        from mobile_vla.sim.collect import collect
        from mobile_vla.sim.scenario import parse_scenarios

        t0 = time.perf_counter()
        results = collect(
            job.out,
            job.episodes,
            parse_scenarios(["all"]),
            seed=job.seed,
            workers=job.workers,
            cfg=SimConfig(image_size=list(job.image_size)),
            progress=False,
            counterfactual=job.counterfactual,
        )
        print(f"wrote {len(results)} episodes to {job.out}")
        phase("collect", time.perf_counter() - t0)
    elif isinstance(job, Train | Resume):
        t0 = time.perf_counter()
        _train(job)
        phase("train", time.perf_counter() - t0)
    elif isinstance(job, Evaluate):
        _evaluate(job)
    else:
        from mobile_vla.analysis.compare import compare_runs

        t0 = time.perf_counter()
        r = compare_runs(job.run_a, job.run_b, job.out, samples=job.samples)
        cka = r["context"]["cka"]
        print(f"compared on {r['inputs']['samples']} windows: context CKA {cka:.4f}")
        phase("compare", time.perf_counter() - t0)


def _train(job: Train | Resume) -> None:
    from mobile_vla.config import load_config
    from mobile_vla.training.run import train
    from mobile_vla.training.runs import Run

    if isinstance(job, Resume):
        run = Run.open(job.run)
        out = train(run.config, resume=run.path, progress=False)
    else:
        out = train(load_config(job.config), progress=False)
    print(f"run folder: {out}")


def phase(name: str, seconds: float) -> None:
    """One machine-readable line in the job's log: how long a phase took (the study reads
    them back into ``results.json["phases"]``)."""
    print(PHASE + json.dumps({"phase": name, "seconds": round(seconds, 2)}), flush=True)


def _evaluate(job: Evaluate) -> None:
    from mobile_vla.evaluation.language import format_language
    from mobile_vla.evaluation.run_eval import evaluate, evaluate_run_language
    from mobile_vla.models.runtime import ChunkSpec
    from mobile_vla.training.runs import Run

    chunk = ChunkSpec(job.chunk, job.chunk_k)
    t0 = time.perf_counter()
    run = Run.open(job.run)  # opened once: the language runs reuse the policy loaded here
    evaluate(run, "best", job.episodes, job.seed, chunk, videos=job.videos, progress=False)
    phase("evaluate (offline + closed loop)", time.perf_counter() - t0)
    if job.language:
        t0 = time.perf_counter()
        result = evaluate_run_language(run, job.language, job.seed, chunk, progress=False)
        print(format_language(result))
        phase("language reliance", time.perf_counter() - t0)
    if job.episodes and job.curve:
        from mobile_vla.evaluation.curve import evaluate_curve, format_curve

        t0 = time.perf_counter()
        print(format_curve(evaluate_curve(run, job.episodes, job.seed, chunk)))
        phase("curve", time.perf_counter() - t0)


def run_jobs(jobs: Iterable[Job], announce_first: bool = False) -> int:
    """Run ``jobs`` in order, stopping at the first failure: 0, or 2 for a user error (its
    one-line message printed, as the CLI does), 1 for anything else (with its traceback).
    Each job's command line is printed before it (the first one's only with
    ``announce_first``: the caller has written it)."""
    for i, job in enumerate(jobs):
        if i or announce_first:
            print(f"$ mobile-vla {job.describe()}", flush=True)
        try:
            execute(job)
        except MobileVLAError as exc:
            print(f"error: {exc}", flush=True)
            return 2
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def describe_all(jobs: Sequence[Job]) -> str:
    return " then ".join(job.describe().split(" ", 1)[0] for job in jobs)
