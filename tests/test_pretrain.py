"""Vision-language pretraining of the built-in backbone: facts, training, resume, metrics,
exported and shipped weights, bad input."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.cli import main
from mobile_vla.config import BackboneConfig, load_config
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.io import file_sha256
from mobile_vla.pretraining import train as pretrain_module
from mobile_vla.pretraining.caption_scenes import (
    Fact,
    captions,
    fact_holds,
    left_right_probe,
    left_right_probe_held_out,
    mirror_fact,
    mirror_objects,
    perturb,
    sample_scene,
    swap_sides,
    true_facts,
)
from mobile_vla.pretraining.config import PretrainConfig
from mobile_vla.pretraining.corpus import build_corpus, load_corpus
from mobile_vla.pretraining.evaluate import retrieval_sets
from mobile_vla.pretraining.model import HeadsConfig
from mobile_vla.pretraining.train import load_run, load_weights_file, pretrain
from mobile_vla.pretraining.weights import (
    WeightsError,
    load_weights,
    read_card,
    shipped_weights,
)

from .conftest import TINY_BUILTIN, tiny_builtin_config

TINY_PRETRAIN = [
    *(o.replace("backbone.builtin.", "backbone.") for o in TINY_BUILTIN if "builtin." in o),
    "steps=150",
    "batch_size=32",
    "itm_images=8",
    "learning_rate=0.002",
    "warmup_steps=10",
    "eval_every=75",
    "eval_images=32",
    "checkpoint_every=50",
    # the instruction probe at export trains read-outs (~16 s a run): only `run` has it
    "policy_probe_scenes=0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pcorpus") / "c"
    build_corpus(out, 240, seed=5, size=32, val_fraction=0.25, workers=2, progress=False)
    return out


def tiny_cfg(corpus: Path, *extra: str) -> PretrainConfig:
    return load_config(None, [f"data={corpus}", *TINY_PRETRAIN, *extra], cls=PretrainConfig)


@pytest.fixture(scope="module")
def run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prun") / "run"
    return pretrain(tiny_cfg(corpus, "policy_probe_scenes=8"), out, progress=False)


def test_captions_are_true_and_perturbations_false() -> None:
    false_perturbations = total = 0
    for seed in range(400):
        scene = sample_scene(seed)
        rng = np.random.default_rng(seed)
        for held_out in (False, True):
            texts, facts = captions(scene, rng, 5, held_out=held_out)
            for text, fact in zip(texts, facts, strict=True):
                assert fact_holds(fact, scene.objects), (text, fact)
                p = perturb(text, fact, rng)
                if p is not None:
                    total += 1
                    false_perturbations += not fact_holds(p[1], scene.objects)
                    assert p[0] != text
    assert false_perturbations / total > 0.95  # the rest are filtered out before training


def test_facts_hold_by_their_rules() -> None:
    objs = [
        {"colour": "red", "shape": "box", "size": "small", "lateral": "left", "depth": "near"},
        {"colour": "blue", "shape": "sphere", "size": "large", "lateral": "centre", "depth": "far"},
        {"colour": "red", "shape": "box", "size": "large", "lateral": "centre", "depth": "near"},
    ]
    red_box, blue_sphere = ["red", "box"], ["blue", "sphere"]
    holds = [
        {"k": "count", "n": 3},
        {"k": "single", "c": "red", "s": "box"},
        {"k": "single", "c": "red", "s": "box", "z": "large"},
        {"k": "place", "c": "blue", "s": "sphere", "lat": "centre", "dep": "far"},
        {"k": "pair", "l": red_box, "r": blue_sphere},  # the red box on the left
        {"k": "pair", "l": red_box, "r": red_box},  # left of the other red box
    ]
    fails = [
        {"k": "count", "n": 2},
        {"k": "single", "c": "blue", "s": "box"},
        {"k": "single", "c": "blue", "s": "sphere", "z": "small"},
        {"k": "place", "c": "red", "s": "box", "lat": "left", "dep": "far"},
        {"k": "pair", "l": blue_sphere, "r": red_box},  # beside the centre red box, not left
    ]
    holds, fails = [Fact.from_json(f) for f in holds], [Fact.from_json(f) for f in fails]
    assert all(f.to_json() == Fact.from_json(f.to_json()).to_json() for f in holds + fails)
    assert all(fact_holds(f, objs) for f in holds)
    assert not any(fact_holds(f, objs) for f in fails)
    # one count, three facts an object ("a red box" once for both) and the two pairs
    assert len(true_facts(objs)) == 1 + 3 * 3 - 1 + 2


def test_pair_templates_do_not_give_away_the_left_object_by_order() -> None:
    """The left object is named first in some training phrasings and second in others, with
    either side word: only the two together say which object is left (so a claim head cannot
    settle on 'the first-named object is on the side the word says')."""
    from mobile_vla.pretraining.caption_scenes import TRAIN_TEMPLATES

    first_is_left = set()
    for template in TRAIN_TEMPLATES["pair"]:
        text = template.format(c1="red", ac1="a red", s1="box", c2="blue", ac2="a blue", s2="ball")
        word = "left" if " left" in text else "right"
        first_is_left.add((text.index("red") < text.index("blue"), word))
    assert first_is_left == {(True, "left"), (True, "right"), (False, "left"), (False, "right")}


def test_side_perturbation_swaps_the_relation() -> None:
    fact = Fact("pair", left=("red", "box"), right=("blue", "sphere"))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        p = perturb("a red box to the left of a blue sphere", fact, rng)
        assert p is not None
        seen.add(p[0])
        if "right" in p[0]:
            assert p[1] == Fact("pair", left=("blue", "sphere"), right=("red", "box"))
    assert "a red box to the right of a blue sphere" in seen
    assert any(s.startswith("an orange box") for s in seen) or any("a " in s for s in seen)


def test_swap_sides_mirrors_the_claim() -> None:
    pair = Fact("pair", left=("red", "box"), right=("blue", "sphere"))
    text, fact = swap_sides("a blue sphere to the right of a red box", pair)
    assert text == "a blue sphere to the left of a red box"
    assert fact.to_json() == {"k": "pair", "l": ["blue", "sphere"], "r": ["red", "box"]}
    place = Fact.from_json({"k": "place", "c": "red", "s": "box", "lat": "left", "dep": "far"})
    assert swap_sides("a red box on the left", place) == (
        "a red box on the right",
        Fact("place", "red", "box", lateral="right", depth="far"),
    )
    assert swap_sides("a red box in the centre", replace(place, lateral="centre")) is None
    assert swap_sides("two objects", Fact("count", count=2)) is None
    # a red box on each side: the swapped caption is true as well, and training drops it
    objs = [
        {"colour": "red", "shape": "box", "size": "small", "lateral": x, "depth": "far"}
        for x in ("left", "right")
    ]
    assert fact_holds(place, objs) and fact_holds(swap_sides("", place)[1], objs)


def test_mirror_image_reads_every_caption_with_sides_swapped() -> None:
    """What head_mirror relies on: a caption is true of a scene exactly when its left/right
    swap is true of the scene's mirror image."""
    for seed in range(150):
        scene = sample_scene(seed)
        mirrored = mirror_objects(scene.objects)
        assert [o["lateral"] for o in mirrored] == sorted(
            (o["lateral"] for o in mirrored), key=["left", "centre", "right"].index
        )
        assert mirror_objects(mirrored) == [asdict(o) for o in scene.objects]
        assert true_facts(mirrored) == {mirror_fact(f) for f in true_facts(scene.objects)}
        rng = np.random.default_rng(seed)
        for text, fact in zip(*captions(scene, rng, 8), strict=True):
            swapped = swap_sides(text, fact)
            seen = swapped if swapped is not None else (text, fact)
            assert fact_holds(seen[1], mirrored) and seen[1] == mirror_fact(fact)


def test_mirrored_rows_swap_their_captions() -> None:
    """The second phase's mirrored rows: the side caption becomes its swap, the caption itself
    is the negative and the order loss's false caption; other captions stay."""
    from mobile_vla.pretraining.losses import _mirror

    pair = Fact("pair", left=("red", "box"), right=("blue", "sphere"))
    count = Fact("count", count=2)
    objs = [
        {"colour": c, "shape": s, "size": "small", "lateral": lat, "depth": "far", "x": 2, "y": y}
        for c, s, lat, y in (("red", "box", "left", 0.5), ("blue", "sphere", "right", -0.5))
    ]
    chosen = [(0, pair), (1, count), (0, pair)]
    negative = [(2, replace(pair, left=("green", "box"))), (3, Fact("count", count=3)), None]
    c, n, s, o = _mirror(chosen, negative, [5, None, 5], [objs] * 3, np.array([True, True, False]))
    assert c[0] == (5, Fact("pair", left=("blue", "sphere"), right=("red", "box")))
    assert n[0] == (0, pair) and s[0] == 0
    assert fact_holds(c[0][1], o[0]) and not fact_holds(n[0][1], o[0])
    assert (c[1], n[1], s[1]) == ((1, count), negative[1], None)
    assert [x["lateral"] for x in o[1]] == ["left", "right"] and o[1][0]["colour"] == "blue"
    assert (c[2], n[2], s[2], o[2]) == (chosen[2], None, 5, objs)


def test_text_order_head_reads_word_order() -> None:
    """The mean-state text embedding cannot see the order of the tokens; with the word-order
    head it can (with its output layer zeroed, it is the plain embedding)."""
    from mobile_vla.pretraining.model import PretrainModel

    cfg = tiny_builtin_config()
    torch.manual_seed(0)
    plain = PretrainModel(cfg)
    torch.manual_seed(0)
    ordered = PretrainModel(cfg, HeadsConfig(text_order_layers=1))
    ordered.text_head.load_state_dict(plain.text_head.state_dict())
    torch.nn.init.zeros_(ordered.text_order.out.weight)
    states, mask = torch.randn(2, 6, 384), torch.ones(2, 6, dtype=torch.bool)
    reversed_states = states.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(
            plain.text_embedding(states, mask), ordered.text_embedding(states, mask)
        )
        torch.testing.assert_close(
            plain.text_embedding(states, mask), plain.text_embedding(reversed_states, mask)
        )
        torch.nn.init.normal_(ordered.text_order.out.weight, std=0.5)
        a = ordered.text_embedding(states, mask)
        b = ordered.text_embedding(reversed_states, mask)
    assert (a - b).abs().max() > 1e-3  # the plain embedding: equal to 1e-6 (above)


def test_retrieval_distractors_are_false_for_the_image(corpus: Path) -> None:
    c = load_corpus(corpus)
    sets = retrieval_sets(c, 0)
    assert len(sets) > 20
    pool = {
        t: f
        for i in c.split("val")
        for t, f in zip(c.records[i]["eval_captions"], c.records[i]["eval_facts"], strict=True)
    }
    for i, cands in sets:
        assert len(cands) == 32 and len(set(cands)) == 32
        assert cands[0] in c.records[i]["eval_captions"]
        assert not any(fact_holds(pool[t], c.records[i]["objects"]) for t in cands[1:])


def test_pretraining_learns_and_reports_every_metric(run: Path) -> None:
    rows = list(csv.DictReader((run / "log.csv").read_text().splitlines()))
    assert len(rows) == 150
    loss = [float(r["loss"]) for r in rows]
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 0.5
    m = json.loads((run / "metrics.json").read_text())["summary"]
    assert m["retrieval_images"] > 20 and m["probe_scenes"] > 10
    # the recorded figures are what evaluating the saved model gives (deterministic), and a
    # 150-step tiny model from scratch stays near chance (1/32 for R@1 among 32 candidates)
    from mobile_vla.pretraining.evaluate import evaluate

    model, cfg, _ = load_run(run)
    again = evaluate(model, load_corpus(cfg.data), cfg)["summary"]
    for key in ("r1_itc", "r5_itc", "r1_itm", "left_right_itm", "colour_itc", "shape_itm"):
        assert again[key] == pytest.approx(m[key], abs=1e-9), key
    assert m["r5_itc"] >= m["r1_itc"] and m["r1_itc"] <= 0.35
    # a tiny ViT from scratch needs more than 150 steps to beat chance at retrieval; the
    # shipped weights do (test_shipped_weights_retrieve_on_freshly_rendered_scenes)
    assert (run / "export" / "builtin-vl.safetensors").is_file()
    card_md = (run / "export" / "MODEL_CARD.md").read_text()
    assert "SHA-256" in card_md
    # the card probes what a policy loading the weights receives, beside the heads' figures,
    # and says which phrasing each left/right figure uses
    probe = json.loads((run / "export" / "builtin-vl.json").read_text())["policy_probe"]
    assert probe["scenes"] == 8 and probe["held_out_scenes"] == 2
    assert len(probe["layers"]) == 4  # entering each of the 3 fusion layers, and the output
    assert set(probe["case3_readout"]) == {"train", "held_out"}
    assert probe["control"]["what"].startswith("the same read-out") and "passed" in probe["control"]
    # before any fusion layer the side word's own token names the side (a real MiniLM)
    assert probe["layers"][0]["side_token"] >= 0.75
    assert "## What a policy receives (`python -m mobile_vla.analysis.instruction_probe" in card_md
    assert "Positive control" in card_md
    assert "training phrasing" in card_md and "no training template uses" in card_md
    assert "held-out phrasings" not in card_md


def test_resume_after_interruption_is_exact(
    corpus: Path, run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pretrain_module.step_losses

    def interrupted(*args, **kwargs):
        if args[-1] == 75:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "step_losses", interrupted)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(corpus), out, progress=False)
    monkeypatch.setattr(pretrain_module, "step_losses", original)
    with pytest.raises(MobileVLAError, match="not empty; use --resume"):
        pretrain(tiny_cfg(corpus), out, progress=False)
    with pytest.raises(MobileVLAError, match="differs from"):
        pretrain(tiny_cfg(corpus, "learning_rate=0.01"), out, resume=True, progress=False)
    pretrain(tiny_cfg(corpus), out, resume=True, progress=False)
    a, _, sa = load_run(run)
    b, _, sb = load_run(out)
    assert sa["step"] == sb["step"] == 150
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
    steps = [int(r["step"]) for r in csv.DictReader((out / "log.csv").read_text().splitlines())]
    assert steps[-1] == 150 and sorted(set(steps)) == list(range(1, 151))


def test_exported_weights_load_into_the_policy_backbone(run: Path, tmp_path: Path) -> None:
    from mobile_vla.models.backbones.builtin import BuiltinBackbone

    weights = run / "export" / "builtin-vl.safetensors"
    model, _, _ = load_run(run)
    cfg = BackboneConfig(builtin=tiny_builtin_config(), pretrained=True)
    cfg.builtin.weights = str(weights)
    backbone = BuiltinBackbone(cfg)
    expected = model.backbone_state()
    state = backbone.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    cfg.pretrained = False
    random_state = BuiltinBackbone(cfg).state_dict()
    assert not torch.equal(random_state["fusion.0.fc1.weight"], expected["fusion.0.fc1.weight"])


def test_weights_refuse_modified_foreign_and_cardless_files(run: Path, tmp_path: Path) -> None:
    src = run / "export" / "builtin-vl.safetensors"
    bad = tmp_path / "w.safetensors"
    shutil.copy(src, bad)
    shutil.copy(src.with_suffix(".json"), bad.with_suffix(".json"))
    load_weights(bad, tiny_builtin_config())  # intact: loads
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"SHA-256 .* modified or corrupted"):
        load_weights(bad, tiny_builtin_config())
    shutil.copy(src, bad)
    other = tiny_builtin_config()
    other.fusion_layers = 2
    with pytest.raises(WeightsError, match=r"another architecture.*fusion_layers: 3"):
        load_weights(bad, other)
    bad.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="no model card"):
        load_weights(bad, tiny_builtin_config())
    # through the config: the error names the file
    with pytest.raises(ConfigError, match="does not exist"):
        from mobile_vla.models.backbones.builtin import BuiltinBackbone

        BuiltinBackbone(
            BackboneConfig(
                builtin=tiny_builtin_config().__class__(
                    **{**tiny_builtin_config().__dict__, "weights": str(tmp_path / "no.st")}
                )
            )
        )


def test_untrained_match_head_is_not_scored(run: Path, corpus: Path, capsys) -> None:
    """With ``itm_weight: 0`` the ITM metrics are absent (None), not noise, and the printed
    summary and the model card say so; the attributes read through the fusion transformer
    are logged as their own loss."""
    from mobile_vla.cli import format_pretrain_metrics
    from mobile_vla.pretraining.evaluate import evaluate
    from mobile_vla.pretraining.weights import model_card_markdown

    rows = list(csv.DictReader((run / "log.csv").read_text().splitlines()))
    assert float(rows[-1]["fusion_attr"]) < float(rows[0]["fusion_attr"])
    model, _, _ = load_run(run)
    off = load_config(None, [f"data={corpus}", *TINY_PRETRAIN, "itm_weight=0"], cls=PretrainConfig)
    m = evaluate(model, load_corpus(corpus), off, limit=16)["summary"]
    assert m["r1_itm"] is None and m["shape_itm"] is None and 0 <= m["r1_itc"] <= 1
    assert "ITM not trained" in format_pretrain_metrics(m)
    card = model_card_markdown({"metrics": m, "pretrain_config": {"itm_weight": 0.0}})
    assert "r1_itm" not in card and "image-text matching" not in card
    assert "image-text matching" in model_card_markdown(
        {"metrics": m, "pretrain_config": {"itm_weight": 1.0, "itm_images": 8}}
    )


def test_pretrain_eval_cli_and_bad_input(run: Path, corpus: Path, tmp_path: Path, capsys) -> None:
    assert main(["pretrain-eval", str(run), "--limit", "24", "-q"]) == 0
    assert "left/right probe" in capsys.readouterr().out
    assert main(["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["pretrain-eval", str(tmp_path)]) == 2
    assert "not a pretraining run" in capsys.readouterr().err
    # a checkpoint of another architecture
    other = tmp_path / "other"
    shutil.copytree(run, other)
    text = (other / "config.yaml").read_text().replace("fusion_layers: 3", "fusion_layers: 2")
    (other / "config.yaml").write_text(text)
    assert main(["pretrain-eval", str(other)]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_shipped_weights_are_intact_small_and_documented() -> None:
    path = shipped_weights()
    card = read_card(path)
    assert card["sha256"] == file_sha256(path)
    assert path.stat().st_size <= 25 * 1024 * 1024
    assert card["architecture"]["image_size"] == load_config(None).backbone.builtin.image_size
    text = (path.parent / "MODEL_CARD.md").read_text()
    assert card["sha256"] in text and card["command"] in text


@pytest.mark.slow
def test_shipped_weights_retrieve_on_freshly_rendered_scenes(tmp_path: Path, capsys) -> None:
    """The default backbone's weights, on scenes rendered now with another seed: held-out
    phrasings, 32 candidates — far above chance (1/32) (contrastive score; the match head is
    not trained, see the card)."""
    c = build_corpus(tmp_path / "c", 300, seed=999, val_fraction=0.5, workers=2, progress=False)
    args = ["pretrain-eval", "--weights", str(shipped_weights()), "--data", str(c), "-q"]
    assert main([*args, "--limit", "100"]) == 0
    out = capsys.readouterr().out
    r1 = float(out.split("R@1 ITC ")[1].split()[0])
    probe = float(out.split("left/right probe")[1].split("ITC ")[1].split()[0])
    # chance: 0.031 and 0.5. On these 100 images (76 probe scenes; the computation is
    # deterministic) R@1 is 0.690 and the probe 0.941; the card's probe is 0.922 on 886
    # held-out scenes, so 0.85 is ~2.5 standard errors below it at 76 scenes
    assert r1 > 0.5 and probe >= 0.85, out


def test_head_phase_trains_only_the_heads_and_resumes_exactly(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With head_steps, the word-order head and its losses are off for the first ``steps``;
    then only the heads of head_modules train (the backbone the policy reads and the map of
    the mean state stay as they were), and a run interrupted in either phase resumes to the
    same weights."""
    extra = (
        "steps=6",
        "head_steps=8",
        "head_batch_size=24",
        "eval_every=0",
        "checkpoint_every=3",
        "text_order_layers=1",
        "text_order_width=32",
        "order_weight=1.0",
        "claim_weight=1.0",
        "head_mirror=true",
    )
    cfg = tiny_cfg(corpus, *extra)
    whole = pretrain(cfg, tmp_path / "whole", progress=False)
    rows = list(csv.DictReader((whole / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 15))
    assert all(r["claim"] == "" and r["order"] == "" for r in rows[:6])
    assert all(float(r["claim"]) > 0 and float(r["order"]) > 0 for r in rows[6:])
    first = pretrain_module.load_folder(whole / "checkpoints" / "phase1")
    assert first["step"] == 6 and first["phase"] == "joint"
    card = (whole / "export" / "MODEL_CARD.md").read_text()
    assert "then 8 steps of the heads" in card and "their mirror images" in card

    original = pretrain_module.head_step_losses
    stop_at: list[int] = []

    def interrupted(*args, **kwargs):
        if stop_at and args[-1] == stop_at[0]:
            stop_at.pop()
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "head_step_losses", interrupted)
    out = tmp_path / "cut"
    stop_at.append(6)  # the first second-phase step: right after the first phase's 6 steps
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, out, progress=False)
    at_switch = pretrain_module.load_folder(out / "checkpoints" / "last")
    assert at_switch["step"] == 6 and at_switch["phase"] == "joint"
    for k, v in at_switch["model"].items():
        torch.testing.assert_close(v, first["model"][k], rtol=0, atol=0, msg=k)
    stop_at.append(10)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, out, resume=True, progress=False)
    inside = pretrain_module.load_folder(out / "checkpoints" / "last")
    assert inside["step"] == 9 and inside["phase"] == "heads"
    pretrain(cfg, out, resume=True, progress=False)
    a, _, _ = load_run(whole)
    b, _, _ = load_run(out)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
    # what the second phase changed: the heads it trains only
    final = a.state_dict()
    changed = {k for k, v in at_switch["model"].items() if not torch.equal(v, final[k])}
    assert any(k.startswith("text_order.") for k in changed)
    assert any(k.startswith("image_head.") for k in changed)
    heads = ("text_order.", "claim_head.", "image_pool.", "image_head.")
    assert all(k.startswith(heads) for k in changed), changed


def test_second_phase_redone_from_another_run_is_that_config_from_scratch(
    corpus: Path, run: Path, tmp_path: Path, capsys
) -> None:
    """``--heads-from RUN``: the first phase is RUN's (checkpoints/phase1) and only the second
    trains, with other second-phase keys; the weights are those of the whole run with that
    config. A first-phase key that differs, or a run without phase1, is refused."""
    extra = (
        "steps=5",
        "head_steps=6",
        "head_batch_size=24",
        "eval_every=0",
        "checkpoint_every=4",
        "text_order_layers=1",
        "text_order_width=32",
        "order_weight=1.0",
        "claim_weight=1.0",
    )
    base = pretrain(tiny_cfg(corpus, *extra), tmp_path / "base", progress=False)
    other = tiny_cfg(
        corpus,
        *extra,
        "head_mirror=true",
        "head_learning_rate=0.0003",
        "head_seed=3",
        "head_cells=true",
    )
    fresh = pretrain(other, tmp_path / "fresh", progress=False)
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(tmp_path / "redo"),
                "--heads-from",
                str(base),
                "-q",
                "--data",
                str(corpus),
                *[f"--{kv}" for kv in (*TINY_PRETRAIN, *extra)],
                "--head_mirror=true",
                "--head_learning_rate=0.0003",
                "--head_seed=3",
                "--head_cells=true",
            ]
        )
        == 0
    )
    assert "R@1" in capsys.readouterr().out
    a, _, _ = load_run(fresh)
    b, _, _ = load_run(tmp_path / "redo")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader((tmp_path / "redo" / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 12))
    card = (tmp_path / "redo" / "export" / "MODEL_CARD.md").read_text()
    assert "(seed 3)" in card and "reading the cell probe" in card
    # head_cells: the map of the cell probe starts at zero, trains, and ships with the heads
    assert b.cell_map is not None and float(b.cell_map.weight.abs().sum()) > 0
    shipped = load_weights_file(tmp_path / "redo" / "export" / "builtin-vl.safetensors")
    assert shipped.cell_map is not None
    assert torch.equal(shipped.cell_map.weight, b.cell_map.weight)
    with pytest.raises(ConfigError, match="head_cells"):
        tiny_cfg(corpus, "head_steps=0", "head_cells=true")
    # head_seed: the word-order and claim heads are drawn anew from it at the switch
    first = pretrain_module.load_folder(base / "checkpoints" / "phase1")["model"]
    drawn_a, _, _ = load_run(base)
    drawn_a.load_state_dict(first, strict=False)
    drawn_b = copy.deepcopy(drawn_a)
    drawn_a.reset_word_order(3)
    drawn_b.reset_word_order(3)
    heads = [k for k in first if k.startswith(("text_order.", "claim_head."))]
    assert len(heads) > 10
    for k in heads:
        assert torch.equal(drawn_a.state_dict()[k], drawn_b.state_dict()[k]), k  # seeded
        if "norm" not in k and "bias" not in k:
            # and not the weights the heads were built with
            assert not torch.equal(drawn_a.state_dict()[k], first[k]), k
    with pytest.raises(MobileVLAError, match=r"other \['learning_rate'\]"):
        pretrain(
            tiny_cfg(corpus, *extra, "learning_rate=0.0005"),
            tmp_path / "bad",
            progress=False,
            heads_from=base,
        )
    with pytest.raises(MobileVLAError, match="has no checkpoints/phase1"):
        pretrain(tiny_cfg(corpus, *extra), tmp_path / "bad2", progress=False, heads_from=run)
    with pytest.raises(MobileVLAError, match="head_steps must be > 0"):
        pretrain(tiny_cfg(corpus, *extra, "head_steps=0"), tmp_path / "bad3", heads_from=base)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_bf16_run_says_so_and_reloads(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``precision: bf16-mixed`` trains under bfloat16 autocast and says so on the card; the
    exported heads give ``pretrain-eval --weights`` the trained model's embeddings."""

    seen: list[bool] = []
    original = pretrain_module.step_losses

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "step_losses", spy)
    extra = (
        "precision=bf16-mixed",
        "steps=12",
        "eval_every=0",
        "text_order_layers=1",
        "order_weight=1.0",
        "claim_weight=1.0",
        "image_cells=true",
        "head_steps=3",
        "head_batch_size=16",
    )
    run = pretrain(tiny_cfg(corpus, *extra), tmp_path / "r", progress=False)
    assert seen == [True] * 12
    rows = list(csv.DictReader((run / "log.csv").read_text().splitlines()))
    assert len(rows) == 15  # 12 steps, then 3 of the heads (where order and claim train)
    assert all(float(r["order"]) > 0 and float(r["claim"]) > 0 for r in rows[12:])
    weights = run / "export" / "builtin-vl.safetensors"
    card = read_card(weights)
    assert card["precision"] == card["pretrain_config"]["precision"] == "bf16-mixed"
    assert "precision bf16-mixed" in (run / "export" / "MODEL_CARD.md").read_text()
    trained, _, _ = load_run(run)
    loaded = load_weights_file(weights)  # the word-order and claim heads come back too
    assert loaded.text_order is not None and loaded.image_cells
    # rebuilt from the heads' config the card stores, which is the run's
    assert HeadsConfig.from_json(card["heads"]) == trained.heads_config == loaded.heads_config
    assert card["heads"]["text_order_layers"] == card["pretrain_config"]["text_order_layers"]
    states, mask = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.text_embedding(states, mask), trained.text_embedding(states, mask)
        )
        pixels = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(
            loaded.image_embedding(loaded.vit(pixels)), trained.image_embedding(trained.vit(pixels))
        )
    assert (
        main(
            [
                "pretrain-eval",
                "--weights",
                str(weights),
                "--data",
                str(corpus),
                "--limit",
                "16",
                "-q",
            ]
        )
        == 0
    )


def test_auto_precision_follows_the_processor(monkeypatch: pytest.MonkeyPatch) -> None:
    from mobile_vla import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto") == "32"
    assert hardware.resolve_precision("bf16-mixed") == "bf16-mixed"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=fp16"], cls=PretrainConfig)
    with pytest.raises(ConfigError, match=r"claim_weight.*text_order_layers"):
        load_config(None, ["claim_weight=1.0"], cls=PretrainConfig)
    with pytest.raises(ConfigError, match="order_weight"):
        load_config(None, ["order_weight=-1"], cls=PretrainConfig)
    with pytest.raises(ConfigError, match=r"head_modules\[1\].*one of text_order"):
        load_config(None, ["head_modules=[text_order,vision]"], cls=PretrainConfig)
    with pytest.raises(ConfigError, match=r"text_order_width.*fusion_heads"):
        load_config(None, ["text_order_layers=1", "text_order_width=30"], cls=PretrainConfig)
    with pytest.raises(ConfigError, match="head_steps"):
        load_config(None, ["head_steps=-5"], cls=PretrainConfig)


def test_left_right_probe_is_balanced(
    run: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A score that only prefers the word "left" (or "right") gets exactly half the left/right
    probe right; only one that reads the objects' order can do better."""
    from mobile_vla.pretraining.evaluate import Scorer, evaluate

    model, cfg, _ = load_run(run)
    c = load_corpus(corpus)
    for word in ("left", "right"):
        monkeypatch.setattr(
            Scorer, "itc", lambda self, i, texts, w=word: np.array([w in t for t in texts], float)
        )
        m = evaluate(model, c, cfg, limit=24)["summary"]
        assert m["probe_scenes"] > 5 and m["left_right_itc"] == 0.5
        # the held-out phrasing's pairs hold the same words: a word score ties them
        assert m["left_right_held_out_itc"] == 0.5
    truth = {
        i: {pair[0] for pair in left_right_probe(r["objects"]) or ()}
        | {pair[0] for pair in left_right_probe_held_out(r["objects"]) or ()}
        for i, r in enumerate(c.records)
    }
    monkeypatch.setattr(
        Scorer, "itc", lambda self, i, texts: np.array([t in truth[i] for t in texts], float)
    )
    m = evaluate(model, c, cfg, limit=24)["summary"]
    assert m["left_right_itc"] == m["left_right_held_out_itc"] == 1.0
    # a score that learnt "the first object named is on the left" fails the held-out phrasing
    monkeypatch.setattr(
        Scorer,
        "itc",
        lambda self, i, texts: np.array(
            [t in truth[i] if "there is" not in t else t not in truth[i] for t in texts], float
        ),
    )
    m = evaluate(model, c, cfg, limit=24)["summary"]
    assert m["left_right_itc"] == 1.0 and m["left_right_held_out_itc"] == 0.0


def test_retrieval_counts_ties_against_the_true_caption() -> None:
    from mobile_vla.pretraining.evaluate import hit_probability

    assert hit_probability(np.zeros(32)) == pytest.approx(1 / 32)  # a constant scorer: chance
    assert hit_probability(np.zeros(32), 5) == pytest.approx(5 / 32)
    assert hit_probability(np.array([2.0, 1.0, 0.5])) == 1.0
    assert hit_probability(np.array([1.0, 1.0, 0.5])) == 0.5  # a two-way tie, as the probe
    assert hit_probability(np.array([1.0, 3.0, 1.0, 1.0]), 2) == pytest.approx(1 / 3)
    assert hit_probability(np.array([0.0, 1.0, 2.0])) == 0.0
