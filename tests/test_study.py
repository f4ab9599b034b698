"""``mobile-vla study``: the grid, resuming after an interruption, the report, bad input, and
the report in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mobile_vla.cli import main
from mobile_vla.config import load_config
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.study import grid as grid_module
from mobile_vla.study.cells import CellResult
from mobile_vla.study.grid import Study, StudyConfig, cells
from mobile_vla.study.report import compare_two, success_test

from .conftest import tiny_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write_study(tmp: Path, data: Path, weights: Path, out: Path, **extra: object) -> Path:
    overrides = [
        o
        for o in tiny_overrides(data, tmp)
        if not o.startswith(("data.path", "trainer.output_dir", "data.val_fraction"))
    ]
    study = {
        "base": str(CONFIGS / "base.yaml"),
        "output_dir": str(out),
        "data": {"path": str(data), "split_seed": 0},
        "strategies": ["frozen", "lora"],
        "seeds": [0],
        "train_episodes": [6, 0],
        "pretrained": [True, False],
        "overrides": [
            *overrides,
            "data.val_fraction=0.25",
            f"backbone.builtin.weights={weights}",
            "trainer.max_steps=2",
            "sim.image_size=[32,32]",
            "sim.max_steps=12",
        ],
        "strategy_overrides": {"lora": ["train_setup.lora_lr=0.001"]},
        "closed_loop": {"episodes": 2, "seed": 1000, "curve_steps": [1]},
        "compare_samples": 16,
        **extra,
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def finished(
    train_data: Path, tiny_weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "out"
    config = write_study(tmp, train_data, tiny_weights["tinyweights"], out)
    # interrupted after the second cell ...
    calls = {"n": 0}
    original = grid_module.Study.run_cell

    def flaky(self, cell, data, then=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, cell, data, then)

    grid_module.Study.run_cell = flaky  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            Study(config, progress=False).run()
    finally:
        grid_module.Study.run_cell = original  # type: ignore[method-assign]
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 2
    first = Path(results["cells"][next(iter(results["cells"]))]["run"])
    stamp = (first / "metrics.json").stat().st_mtime_ns
    # ... and run again: the finished cells are kept, the rest run
    assert main(["study", str(config), "-q"]) == 0
    assert (first / "metrics.json").stat().st_mtime_ns == stamp  # not redone
    return config, out


def test_study_grid_resumes_and_reports(finished: tuple[Path, Path]) -> None:
    _, out = finished
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 8
    assert set(results["compare"]) == {
        f"frozen-vs-lora-{p}-{n}-s0" for p in ("pt", "rand") for n in ("n6", "nall")
    }
    for c in results["cells"].values():
        assert c["closed_loop"]["episodes"] == 2
        assert c["trainable_params"] > 0 and c["peak_memory_bytes"] > 0
    sizes = {c["key"]["train_episodes"]: c["episodes"]["train"] for c in results["cells"].values()}
    assert sizes[6] == 6 and sizes[0] > 6
    lora = results["cells"]["lora-pt-nall-s0"]
    frozen = results["cells"]["frozen-pt-nall-s0"]
    assert lora["trainable_params"] > frozen["trainable_params"]
    md = (out / "report.md").read_text()
    for heading in (
        "Strategies (pretrained backbone, all training episodes)",
        "What the study says",
        "Data efficiency",
        "With and without vision-language pretraining",
        "Frozen vs LoRA",
        "How each strategy drives",
    ):
        assert heading in md
    assert (out / "figures" / "data_efficiency.png").stat().st_size > 10_000
    # 2 closed-loop episodes per cell, both instructed left here
    for name in (
        "trajectories_frozen_left",
        "trajectories_lora_left",
        "instruction_sensitivity",
        "success_vs_steps",
    ):
        assert (out / "figures" / f"{name}.png").stat().st_size > 2_000, name
    # success against steps: step 1 (kept by closed_loop.curve_steps) and the last step, 2
    assert [p["step"] for p in lora["curve"]["points"]] == [1, 2]
    assert "Case 3 (frozen) vs Case 4 (LoRA), closed-loop success" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and 'src="figures' not in page
    assert results["report"]["statement"]
    # one list of sections rendered twice: the same headings, tables and figures in both
    headings = [line.lstrip("#").strip() for line in md.splitlines() if line.startswith("##")]
    assert headings == re.findall(r"<h[23]>([^<]*)</h[23]>", html.unescape(page))
    assert md.count("![") == page.count("<figure>")
    assert md.count("|---|") >= page.count("<table>") >= 4


def test_finished_study_is_not_redone_and_settings_are_guarded(
    finished: tuple[Path, Path], capsys
) -> None:
    config, out = finished
    before = (out / "results.json").read_text()
    assert main(["study", str(config)]) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, skipped") == 8
    assert json.loads(before)["cells"] == json.loads((out / "results.json").read_text())["cells"]
    changed = config.read_text().replace("trainer.max_steps=2", "trainer.max_steps=3")
    other = config.with_name("changed.yaml")
    other.write_text(changed)
    assert main(["study", str(other)]) == 2
    assert "different settings" in capsys.readouterr().err


def test_interrupted_training_inside_a_cell_resumes(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    config, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    text = config.read_text().replace(str(out), str(copy))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text)
    results = json.loads((copy / "results.json").read_text())
    del results["cells"]["lora-rand-n6-s0"]
    (copy / "results.json").write_text(json.dumps(results))
    run = copy / "cells" / "lora-rand-n6-s0"
    (run / "train_stats.json").unlink()
    (run / "metrics.json").unlink()
    Study(cfg, progress=False).run()
    log = (copy / "logs" / "lora-rand-n6-s0.log").read_text()
    assert "train --resume" in log
    assert "lora-rand-n6-s0" in json.loads((copy / "results.json").read_text())["cells"]


def test_study_config_errors(tmp_path: Path, train_data: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(CONFIGS / "base.yaml"), "strategies": ["frozn"]}))
    with pytest.raises(ConfigError, match=r"strategies\[0\].*one of frozen, lora"):
        Study(bad)
    bad.write_text(yaml.safe_dump({"base": "nope.yaml"}))
    with pytest.raises(ConfigError, match=r"'nope.yaml' not found"):
        Study(bad)
    bad.write_text(
        yaml.safe_dump(
            {"base": str(CONFIGS / "base.yaml"), "strategy_overrides": {"full": ["seed=1"]}}
        )
    )
    with pytest.raises(ConfigError, match=r"strategy_overrides\.full"):
        Study(bad)
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{")
    bad.write_text(yaml.safe_dump({"base": str(CONFIGS / "base.yaml"), "output_dir": str(out)}))
    with pytest.raises(MobileVLAError, match="not valid JSON"):
        Study(bad, progress=False).run()


def test_exclude_leaves_matching_cells_out_and_refuses_rules_that_match_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "strategies: [frozen_text, frozen, lora]\nseeds: [0, 1]\ntrain_episodes: [48, 0]\n"
        "exclude:\n  - {strategy: frozen, train_episodes: 48}\n"
        "  - {strategy: lora, train_episodes: 48}\n  - {strategy: frozen_text, seed: 1, "
        "train_episodes: 48}\n"
    )
    study = load_config(path, cls=StudyConfig)
    ids = [c.id for c in cells(study)]
    assert len(cells(study, excluding=False)) == 12 and len(ids) == 7
    assert "frozen_text-pt-n48-s0" in ids and "frozen_text-pt-n48-s1" not in ids
    assert not any(i.startswith(("frozen-pt-n48", "lora-pt-n48")) for i in ids)
    assert "lora-pt-nall-s1" in ids
    bad = {
        "exclude: [{strategy: full}]": r"exclude\[0\].*matches no cell",
        "exclude: [{}]": r"exclude\[0\].*at least one of",
        "exclude: [{strategy: frozen}, {strategy: lora}]": r"exclude.*at least one cell",
        "exclude: [{steps: 3}]": r"exclude\[0\]\.steps",
    }
    for text, match in bad.items():
        path.write_text("strategies: [frozen, lora]\n" + text + "\n")
        with pytest.raises(ConfigError, match=match):
            load_config(path, cls=StudyConfig)


def test_grid_order_and_noise_rules() -> None:
    study = StudyConfig(
        strategies=["frozen", "lora"],
        seeds=[0, 1],
        train_episodes=[10, 0],
        pretrained=[False, True],
    )
    ids = [c.id for c in cells(study)]
    assert len(ids) == 16 and ids[0] == "frozen-pt-nall-s0" and ids[-1] == "lora-rand-n10-s1"

    def cell(v: float, k: int = 0, n: int = 0) -> CellResult:
        return CellResult.from_json(
            {
                "offline": {"val_loss": v},
                "closed_loop": {"successes": k, "episodes": n, "success_rate": k / n if n else 0},
            }
        )

    get = lambda c: c.offline.val_loss  # noqa: E731
    assert (
        compare_two([cell(1.0), cell(1.1)], [cell(1.05), cell(1.12)], get, False)["verdict"]
        == "within noise"
    )
    assert (
        compare_two([cell(1.0), cell(1.01)], [cell(2.0), cell(2.01)], get, False)["verdict"] == "a"
    )
    assert compare_two([cell(1.0)], [cell(2.0)], get, False)["verdict"].startswith("no noise")
    # two seeds each: |diff| 2.2 > 2 s.e. (1.41), but Welch's t with 2 df gives p = 0.09
    t = compare_two([cell(0.0), cell(1.0)], [cell(2.2), cell(3.2)], get, False)
    assert t["verdict"] == "within noise" and t["p"] == pytest.approx(0.0897, abs=2e-3)
    assert t["diff"] == pytest.approx(-2.2) and t["ci95"][0] < t["diff"] < 0 < t["ci95"][1]
    assert t["g"] < 0
    s = success_test([cell(0, 20, 24)], [cell(0, 4, 24)])
    assert s["diff"] == pytest.approx(16 / 24) and s["ci95"][0] < s["diff"] < s["ci95"][1] <= 1
    assert success_test([cell(0, 20, 24)], [cell(0, 4, 24)])["verdict"] == "a"
    assert success_test([cell(0, 12, 24)], [cell(0, 10, 24)])["verdict"] == "within noise"


def test_report_renders_in_headless_chromium(finished: tuple[Path, Path], tmp_path: Path) -> None:
    """Open report.html in Debian's Chromium (installed by `make test`): no console errors,
    every image decoded, and a screenshot."""
    from playwright.sync_api import sync_playwright  # a dev dependency (make install)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is installed by `make test` (Makefile sysdeps)"
    _, out = finished
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
        )
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    assert len(images) >= 2 and all(ok and width > 0 for ok, width, _ in images), images
    assert shot.stat().st_size > 20_000


@pytest.mark.parametrize("fork_worker", [True, False], ids=["worker", "fresh-process"])
def test_cell_commands_and_their_failures(
    tmp_path: Path, train_data: Path, tiny_weights: dict[str, Path], fork_worker: bool
) -> None:
    """A cell's jobs run in a child (forked by the study's worker, or a fresh interpreter),
    calling the library directly: output lands in the cell's log, a failure names the jobs,
    the exit code and the log, and the worker survives it for the next cell."""
    from mobile_vla.study.jobs import Collect, Evaluate, from_json, to_json

    config = write_study(tmp_path, train_data, tiny_weights["tinyweights"], tmp_path / "out")
    study = Study(config, progress=False, fork_worker=fork_worker)
    log = tmp_path / "cell.log"
    missing = tmp_path / "no_such_run"
    data = tmp_path / "collected"
    try:
        failed = r"'mobile-vla eval' failed \(exit 2\); see .*cell"
        with pytest.raises(MobileVLAError, match=failed):
            study._jobs([Evaluate(str(missing))], log)
        worker = study._proc
        assert (worker is not None) == fork_worker
        second = tmp_path / "collected2"
        study._jobs(
            [Collect(str(data), 2, 1, 0, (24, 24)), Collect(str(second), 2, 1, 1, (24, 24))], log
        )
        assert study._proc is worker  # the same worker ran the next cell
    finally:
        study.close()
    assert study._proc is None
    if worker is not None:
        assert worker.poll() is not None  # closed with the study
    text = log.read_text()
    assert "$ mobile-vla eval" in text and str(missing) in text
    assert text.count("$ mobile-vla collect") == 2  # the chained job's line too
    assert "wrote 2 episodes" in text.split("$ mobile-vla collect")[-1]  # its output, logged
    assert len(list(data.glob("*.h5"))) == 2
    job = Evaluate(str(missing), 4, 7, "first_k", 3, 1)
    assert from_json(json.loads(json.dumps(to_json(job)))) == job


def test_rollout_strip_takes_evenly_spaced_frames(tmp_path: Path) -> None:
    from PIL import Image

    from mobile_vla.study.report import _rollout_strip

    frames = [Image.new("RGB", (10, 6), (i * 20, 0, 0)) for i in range(12)]
    gif = tmp_path / "rollout.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    strip = _rollout_strip(gif, tmp_path / "strip.png", frames=4)
    assert strip is not None
    with Image.open(strip) as im:
        assert im.size == (4 * 10 + 3 * 2, 6)
        reds = [im.getpixel((i * 12 + 5, 3))[0] for i in range(4)]
    assert reds[0] < reds[1] < reds[2] < reds[3] and reds[0] < 10 and reds[3] > 200
    assert _rollout_strip(tmp_path / "missing.gif", tmp_path / "x.png") is None


def test_the_statement_answers_frozen_against_lora_with_its_tests() -> None:
    """Case 3 vs Case 4 gets its own sentences (success: pooled episodes, z; instruction
    sensitivity: Welch's t) even when a third strategy leads the grid."""
    from mobile_vla.study.report import statement

    def cell(strategy: str, seed: int, k: int, sens: float) -> dict:
        return {
            "key": {"strategy": strategy, "pretrained": True, "train_episodes": 0, "seed": seed},
            "offline": {"instruction_sensitivity": {"mean_abs_diff": sens}},
            "closed_loop": {"successes": k, "episodes": 24, "success_rate": k / 24},
        }

    results = {
        "study": {"strategies": ["frozen", "lora", "frozen_text"], "seeds": [0, 1]},
        "cells": {
            f"{s}-{seed}": cell(s, seed, k, v)
            for s, ks, vs in (
                ("frozen", (0, 1), (0.010, 0.012)),
                ("lora", (9, 11), (0.40, 0.44)),
                ("frozen_text", (20, 21), (0.70, 0.72)),
            )
            for seed, k, v in zip((0, 1), ks, vs, strict=True)
        },
    }
    lines = statement(results, [])
    case = [line for line in lines if line.startswith("Case 3 (frozen) vs Case 4")]
    assert len(case) == 2
    assert "LoRA is better" in case[0] and "1/48 vs 20/48" in case[0] and "z = " in case[0]
    assert "LoRA follows it more" in case[1] and "Welch t" in case[1]
    results["cells"]["lora-1"]["closed_loop"]["successes"] = 0
    results["cells"]["lora-0"]["closed_loop"]["successes"] = 2
    lines = statement(results, [])
    assert any("neither is better beyond noise (1/48 vs 2/48" in line for line in lines)
