"""A cell's jobs (:mod:`mobile_vla.study.jobs`) in one process, in order, stopping at the
first failure.

A study cell trains and then evaluates; run as two processes, each pays the interpreter and
library start-up again (about 7 s on two cores). ``python -m mobile_vla.study.chain JSON`` takes
a JSON list of jobs and runs them.

``python -m mobile_vla.study.chain --serve`` is the study's worker: it imports the libraries
once, then for each request line ``{"log": PATH, "jobs": [{...}, ...]}`` on standard input
forks a child that runs the jobs with its output appended to PATH, and answers one line
``{"exit": CODE}``. Each cell still runs in a process of its own (its own peak memory, a crash
stays in the cell) without paying the start-up again. Linux only (``fork``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

READY = "ready"
#: the environment variable through which the study names itself to its worker and cells
PARENT_ENV = "MOBILE_VLA_PARENT_PID"


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (a study killed with
    ``kill -9`` leaves no worker or cell behind to write into its folder), and exit at once if
    the parent ``parent`` is already gone. Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _study_pid() -> int | None:
    """The study's PID, taken out of the environment so that what this process starts (a
    relaunched multi-device trainer, say) does not take it for its own parent."""
    value = os.environ.pop(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def run_serialized(jobs: Sequence[dict[str, Any]]) -> int:
    """Run jobs given as JSON objects (the first one's line is written by the caller)."""
    from mobile_vla.study.jobs import from_json, run_jobs

    return run_jobs([from_json(j) for j in jobs])


def preload() -> None:
    """What every cell's commands import, so that a forked child starts with it loaded. No
    threads or GL contexts start here (they would not survive ``fork``)."""
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mobile_vla.analysis.compare
    import mobile_vla.evaluation.closed_loop
    import mobile_vla.evaluation.offline
    import mobile_vla.models.policy
    import mobile_vla.sim.env
    import mobile_vla.study.jobs
    import mobile_vla.training.module
    import mobile_vla.training.run  # noqa: F401


def _child(log: str, jobs: Sequence[dict[str, Any]]) -> None:
    """In the forked child: output to ``log``, run, and leave without the parent's cleanup."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        code = run_serialized(jobs)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(stdin=None, stdout=None) -> int:  # type: ignore[no-untyped-def]
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    preload()
    print(READY, file=stdout, flush=True)
    for line in stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        worker = os.getpid()
        pid = os.fork()
        if pid == 0:
            die_with_parent(worker)
            _child(request["log"], request["jobs"])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), file=stdout, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = _study_pid()
    if study is not None:
        die_with_parent(study)
    if argv == ["--serve"]:
        return serve()
    jobs = json.loads(argv[0]) if len(argv) == 1 else None
    if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        print('usage: python -m mobile_vla.study.chain \'[{"kind": "Train", ...}, ...]\'')
        print("       python -m mobile_vla.study.chain --serve")
        return 2
    return run_serialized(jobs)


if __name__ == "__main__":
    sys.exit(main())
