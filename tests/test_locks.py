"""One writer per folder: ``mobile-vla study`` and ``mobile-vla train`` hold a lock on the folder
they write, a second writer is refused by PID, a lock whose holder died is taken over, and a
study killed with ``kill -9`` leaves no worker or cell process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobile_vla.cli import main
from mobile_vla.errors import MobileVLAError
from mobile_vla.io import LOCK_NAME, folder_lock

from .conftest import tiny_overrides
from .test_study import CONFIGS, write_study

HOLD = (
    "import sys, time\n"
    "from mobile_vla.io import folder_lock\n"
    "with folder_lock(sys.argv[1], 'a test holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (killed by the caller)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    proc = hold(tmp_path)
    try:
        with pytest.raises(MobileVLAError) as err, folder_lock(tmp_path, "second"):
            pass
        text = str(err.value)
        assert f"PID {proc.pid}" in text and "a test holder" in text and f"kill {proc.pid}" in text
    finally:
        proc.kill()
        proc.wait()
    # the holder died without letting go (SIGKILL): its record stays, the kernel's lock does not
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    said: list[str] = []
    with folder_lock(tmp_path, "third", said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said == [f"taking over the lock on '{tmp_path}' from PID {proc.pid} (no longer running)"]
    # a clean exit leaves nothing to take over
    said.clear()
    with folder_lock(tmp_path, "fourth", said.append):
        pass
    assert said == [] and (tmp_path / LOCK_NAME).read_text() == ""


def test_a_second_study_or_train_on_a_held_folder_is_refused(
    tmp_path: Path, train_data: Path, tiny_weights: dict[str, Path], capsys
) -> None:
    out = tmp_path / "study"
    config = write_study(tmp_path, train_data, tiny_weights["tinyweights"], out)
    proc = hold(out)
    try:
        assert main(["study", str(config), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {proc.pid}" in err and "one writer per folder" in err
        assert not (out / "results.json").exists()
        run = tmp_path / "runs" / "held"
        run_proc = hold(run)
        try:
            over = [*tiny_overrides(train_data, tmp_path), "trainer.run_name=held"]
            over += [f"backbone.builtin.weights={tiny_weights['tinyweights']}"]
            args = ["train", str(CONFIGS / "base.yaml"), *[f"--{o}" for o in over], "-q"]
            assert main(args) == 2
            assert f"in use by PID {run_proc.pid}" in capsys.readouterr().err
            assert not (run / "checkpoints").exists()
        finally:
            run_proc.kill()
            run_proc.wait()
    finally:
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)
@pytest.mark.serial
def test_kill_9_of_a_study_leaves_no_process_and_the_rerun_trains_each_cell_once(
    tmp_path: Path, train_data: Path, tiny_weights: dict[str, Path]
) -> None:
    out = tmp_path / "study"
    config = write_study(
        tmp_path,
        train_data,
        tiny_weights["tinyweights"],
        out,
        strategies=["frozen"],
        train_episodes=[0],
        pretrained=[True],
        strategy_overrides={},
    )
    text = config.read_text().replace("trainer.max_steps=2", "trainer.max_steps=400")
    text = text.replace("trainer.max_epochs=1\n", "trainer.max_epochs=1000\n")
    assert "max_epochs=1000" in text
    config.write_text(text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    said = open(tmp_path / "study.out", "w")  # noqa: SIM115 - closed below
    study = subprocess.Popen(
        [sys.executable, "-m", "mobile_vla.cli", "study", str(config), "-q"],
        env=env,
        stdout=said,
        stderr=subprocess.STDOUT,
    )
    cell_log = out / "logs" / "frozen-pt-nall-s0.log"
    deadline = time.time() + 120
    below: set[int] = set()
    while time.time() < deadline and study.poll() is None:  # until the cell is training
        below = _descendants(study.pid)
        if len(below) >= 2 and cell_log.exists() and "$ mobile-vla train" in cell_log.read_text():
            break
        time.sleep(0.5)
    else:
        study.kill()
        study.wait()
        said.close()
        pytest.fail(f"the study's cell did not start: {(tmp_path / 'study.out').read_text()}")
    time.sleep(2)
    study.send_signal(signal.SIGKILL)
    study.wait()
    said.close()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in below):
        time.sleep(0.2)
    left = [p for p in below if Path(f"/proc/{p}").exists()]
    # a zombie is gone in all but its entry: count only processes still running
    running = [p for p in left if Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"]
    assert running == [], f"processes of the killed study still running: {running}"
    # rerun at once: it is not refused, finishes the cell, and no second writer ever ran
    assert main(["study", str(config), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["cells"]) == ["frozen-pt-nall-s0"]
    log = cell_log.read_text()
    assert log.count("$ mobile-vla train") == 2  # the killed start and the rerun's (resume or new)
