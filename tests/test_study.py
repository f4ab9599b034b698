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
        "closed_loop": {"episodes": 2, "seed": 1000, "curve_steps": [1], "language_scenes": 2},
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
        failed = c["closed_loop"]["episodes"] - c["closed_loop"]["successes"]
        assert sum(c["closed_loop"]["failures"].values()) == failed
        assert c["trainable_params"] > 0 and c["peak_memory_bytes"] > 0
    sizes = {c["key"]["train_episodes"]: c["episodes"]["train"] for c in results["cells"].values()}
    assert sizes[6] == 6 and sizes[0] > 6
    lora = results["cells"]["lora-pt-nall-s0"]
    frozen = results["cells"]["frozen-pt-nall-s0"]
    assert lora["trainable_params"] > frozen["trainable_params"]
    md = (out / "report.md").read_text()
    for heading in (
        "Budgets",
        "Strategies (pretrained backbone, all training episodes)",
        "Does the policy follow the instruction? (closed loop)",
        "What the study says",
        "Where the time went",
        "Data efficiency",
        "With and without vision-language pretraining",
        "Frozen vs LoRA",
        "How each strategy drives",
        "| failures, pooled |",
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
    # every arm's budget, its language reliance and where the time went are recorded
    assert lora["budget"]["steps"] == frozen["budget"]["steps"] == 2
    assert lora["budget"]["lr"]["lora"] == 0.001 and "lora" not in frozen["budget"]["lr"]
    assert lora["budget"]["windows_seen"] > 0 and lora["budget"]["timeline"][-1][0] == 2
    assert lora["language"]["scenes"] == 2 and 0 <= lora["language"]["score"] <= 1
    phases = results["phases"]
    assert set(phases["cells"]) == set(results["cells"])
    assert {"train", "evaluate (offline + closed loop)", "language reliance", "curve"} <= set(
        phases["cells"]["lora-pt-nall-s0"]
    )
    assert phases["report"] > 0 and phases["total_this_invocation"] > 0
    assert "equal budgets" in md or "budgets differ" in md
    assert (out / "figures" / "success_vs_seconds.png").stat().st_size > 2_000
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
    # the base config's content (not only its path) and the built-in weights are guarded too
    fingerprint = out / "base_fingerprint.json"
    saved = fingerprint.read_text()
    data = json.loads(saved)
    assert data["base_config"]["trainer"]["max_steps"] and "builtin_weights_sha256" in data
    data["base_config"]["head"]["hidden_size"] += 1  # as if the base file had been edited
    fingerprint.write_text(json.dumps(data))
    try:
        assert main(["study", str(config)]) == 2
        assert "base_config.head.hidden_size" in capsys.readouterr().err
    finally:
        fingerprint.write_text(saved)


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


def _cell(strategy: str, seed: int, wins: list[bool], sens: float, steps: int = 400) -> dict:
    """A cell's results.json entry: closed loop on scenes 0..n-1 of seed 1000 (``wins``), its
    instruction sensitivity and its budget."""
    n = len(wins)
    return {
        "key": {"strategy": strategy, "pretrained": True, "train_episodes": 0, "seed": seed},
        "offline": {"instruction_sensitivity": {"mean_abs_diff": sens}},
        "closed_loop": {
            "successes": sum(wins),
            "episodes": n,
            "success_rate": sum(wins) / n,
            "seed": 1000,
            "episodes_detail": [{"index": i, "success": w} for i, w in enumerate(wins)],
        },
        "budget": {
            "strategy": strategy,
            "train_episodes": 336,
            "steps": steps,
            "batch": 4,
            "window": 24,
            "per_step": True,
            "windows_seen": 96 * steps,
            "lr": {
                "head": 0.001,
                "action_token": 0.001,
                **({"lora": 0.001} if strategy == "lora" else {}),
            },
            "warmup_steps": 20,
            "schedule": "cosine to x0.1",
            "checkpoint": "best",
            "train_time_s": 10.0 * steps / 400,
            "timeline": [[steps, 10.0 * steps / 400]],
        },
    }


def test_the_statement_answers_frozen_against_lora_with_its_tests() -> None:
    """Case 3 vs Case 4 gets its own sentences even when a third strategy leads the grid:
    closed-loop success paired on the same scenes with seeds as clusters (a difference is
    named only when its interval excludes 0, else "not shown" with what the design could
    resolve), instruction sensitivity with Welch's t, and each line says whether the budgets
    were equal — and names what differs when they were not."""
    from mobile_vla.study.report import statement

    def results(frozen: list[list[bool]], lora: list[list[bool]], lora_steps: int = 400) -> dict:
        cells = {}
        for s, runs, sens, steps in (
            ("frozen", frozen, (0.010, 0.012), 400),
            ("lora", lora, (0.40, 0.44), lora_steps),
            ("frozen_text", [[True] * 24, [True] * 23 + [False]], (0.70, 0.72), 400),
        ):
            for seed, (wins, v) in enumerate(zip(runs, sens, strict=True)):
                cells[f"{s}-{seed}"] = _cell(s, seed, wins, v, steps)
        return {
            "study": {"strategies": ["frozen", "lora", "frozen_text"], "seeds": [0, 1]},
            "cells": cells,
        }

    blind = [[i == 3 for i in range(24)], [False] * 24]
    follows = [[i % 6 != 0 for i in range(24)], [i % 5 != 0 for i in range(24)]]
    lines = statement(results(blind, follows), [])
    case = [line for line in lines if line.startswith("Case 3 (frozen) vs Case 4")]
    assert len(case) == 2
    assert "**Case 4 (LoRA) drives better**" in case[0] and "same 24 scenes" in case[0]
    assert "95% CI" in case[0] and "equal budgets" in case[0]
    assert "LoRA follows it more" in case[1] and "Welch t" in case[1]
    assert "equal budgets" in case[1]
    headline = next(line for line in lines if line.startswith("Headline setting"))
    assert "frozen 2, lora 2, frozen_text 2" in headline
    # close arms: not shown, and how much the design could have shown
    close = [[i % 2 == 0 for i in range(24)], [i % 3 == 0 for i in range(24)]]
    nearby = [[i % 2 == 1 for i in range(24)], [i % 3 == 1 for i in range(24)]]
    line = next(
        x
        for x in statement(results(close, nearby), [])
        if "closed-loop" in x and x.startswith("Case 3")
    )
    assert "a difference is **not shown**" in line and "beyond about ±" in line
    # both arms blind on every scene: no discordant pair, so no resolution is claimed
    zero = [[False] * 24, [False] * 24]
    line = next(
        x
        for x in statement(results(zero, zero), [])
        if "closed-loop" in x and x.startswith("Case 3")
    )
    assert "not shown** (the arms did the same on every scene, both at 0%" in line
    assert "beyond about" not in line and "neither arm drives at this budget" in line
    # budgets that differ beyond the strategy are named in the verdict's own line
    lines = statement(results(blind, follows, lora_steps=2000), [])
    line = next(x for x in lines if x.startswith("Case 3 (frozen) vs Case 4") and "success" in x)
    assert "budgets differ beyond the strategy" in line and "steps 400 vs 2,000" in line
    assert "supervised pairs seen 38,400 vs 192,000" in line
    assert all("budgets" in x for x in lines if " vs " in x and ("best" in x or "shown" in x))


def test_paired_success_resamples_scenes_together_and_seeds_as_clusters() -> None:
    from mobile_vla.study.paired import paired_success

    def cells(strategy: str, runs: list[list[bool]], seed: int = 1000) -> list[CellResult]:
        out = []
        for k, wins in enumerate(runs):
            d = _cell(strategy, k, wins, 0.1)
            d["closed_loop"]["seed"] = seed
            out.append(CellResult.from_json(d))
        return out

    a = cells("lora", [[True] * 20 + [False] * 4, [True] * 18 + [False] * 6])
    b = cells("frozen", [[True] * 2 + [False] * 22, [False] * 24])
    test = paired_success(a, b)
    assert test["verdict"] == "a" and test["scenes"] == 24 and test["seeds"] == [2, 2]
    assert test["diff"] == pytest.approx(38 / 48 - 2 / 48)
    assert test["ci95"][0] > 0.5 and test["discordant"] == [36, 0]
    assert paired_success(a, a)["verdict"] == "not shown"
    assert paired_success(a, b)["ci95"] == test["ci95"]  # a fixed bootstrap seed
    other = cells("frozen", [[False] * 24, [False] * 24], seed=7)
    assert paired_success(a, other)["verdict"] == "n/a"  # other scenes: no pairing


def test_paired_cli_reads_eval_metrics_of_several_seeds_per_run(tmp_path: Path, capsys) -> None:
    """python -m mobile_vla.study.paired: each argument one training run, its evaluations on
    several closed-loop seeds joined by commas; scenes are (closed-loop seed, index)."""
    from mobile_vla.study.paired import main

    def metrics(name: str, seed: int, wins: list[bool]) -> str:
        detail = [{"index": i, "success": w} for i, w in enumerate(wins)]
        path = tmp_path / f"{name}_{seed}.json"
        path.write_text(json.dumps({"closed_loop": {"seed": seed, "episodes_detail": detail}}))
        return str(path)

    good, bad = [True] * 10 + [False] * 2, [False] * 11 + [True]
    a = [f"{metrics(f'a{k}', 11, good)},{metrics(f'a{k}', 12, good)}" for k in range(2)]
    b = [f"{metrics(f'b{k}', 11, bad)},{metrics(f'b{k}', 12, bad)}" for k in range(2)]
    assert main(["--a", *a, "--b", *b]) == 0
    out = capsys.readouterr().out
    assert "closed-loop seeds [11, 12]" in out and "same 24 scenes" in out
    assert "(2 and 2 training seeds)" in out and "verdict: A better" in out
    assert main(["--a", *a, "--b", *a]) == 0 and "not shown" in capsys.readouterr().out
    other = metrics("c", 13, good)
    assert main(["--a", *a, "--b", other]) == 2
    assert "share no scene" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{}")
    assert main(["--a", str(tmp_path / "broken.json"), "--b", *b]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "closed_loop" in err


def test_budget_differences_name_what_is_not_the_strategy() -> None:
    from mobile_vla.study.budgets import budget_clause, budget_differences, budget_row

    frozen = _cell("frozen", 0, [True], 0.1)["budget"]
    lora = _cell("lora", 0, [True], 0.1)["budget"]
    assert budget_differences([frozen], [lora]) == []  # the LoRA group is the strategy's own
    assert budget_clause([frozen], [lora]).startswith("equal budgets")
    slow = {
        **lora,
        "steps": 30,
        "batch": 1,
        "windows_seen": 720,
        "lr": {**lora["lr"], "head": 0.01},
    }
    diff = budget_differences([frozen], [slow])
    assert "steps 400 vs 30" in diff and "batch 4 vs 1" in diff
    assert "head learning rate 0.001 vs 0.01" in diff
    # a recipe's data and losses are part of the budget: twins and the instruction read-out
    recipe = {**lora, "counterfactual": True, "instruction_aux_weight": 1.0}
    plain = {**lora, "counterfactual": False, "instruction_aux_weight": 0.0}
    diff = budget_differences([recipe], [plain])
    assert diff == ["counterfactual twins True vs False", "instruction read-out weight 1 vs 0"]
    assert budget_clause([frozen], [None]).startswith("budgets not recorded")
    row = budget_row("lora", [lora, {**lora, "train_time_s": 12.0}], [0, 1])
    assert row[2] == "400" and "lora 0.001" in row[5] and row[7] == "10 / 12" and row[-1] == "0, 1"
