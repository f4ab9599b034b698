"""Image-caption scenes for the built-in backbone's vision-language pretraining.

Rendered with the simulator's engine but unlike the navigation task: one to four objects
(boxes, bottles, baskets, cylinders, spheres) in named colours and two sizes, placed in a grid
of lateral (left / centre / right) and depth (near / far) cells, under varied floors, walls,
lighting and camera poses. There is no corridor, no start pose and never the navigation
layout (an obstacle in the middle with a target straight behind it).

Each scene comes with captions from several template families that name objects, colours,
sizes, positions and pairwise left/right and near/far relations. Some templates are held out
for evaluation (``EVAL_TEMPLATES``), so retrieval is measured on phrasings never trained on.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.1),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.92, 0.85, 0.15),
    "orange": (0.95, 0.5, 0.08),
    "purple": (0.5, 0.18, 0.65),
    "white": (0.93, 0.93, 0.93),
    "black": (0.07, 0.07, 0.07),
    "grey": (0.5, 0.5, 0.5),
    "brown": (0.45, 0.27, 0.12),
    "pink": (0.95, 0.5, 0.7),
    "cyan": (0.1, 0.8, 0.85),
}
SHAPES = ("box", "bottle", "basket", "cylinder", "sphere")
SIZES = ("small", "large")
LATERAL = {"left": 0.45, "centre": 0.0, "right": -0.45}
DEPTH = {"near": 1.1, "far": 1.8}

TRAIN_TEMPLATES = {
    "single": ("{ac} {s}", "a {size} {c} {s}", "there is {ac} {s}", "a photo of {ac} {s}"),
    "place": (
        "{ac} {s} {where}",
        "the {c} {s} is {dist} {where}",
        "{ac} {s}, {dist}, {where}",
        # the side named before the object too
        "{where} is {ac} {s}, {dist}",
        "{dist} and {where}: {ac} {s}",
    ),
    # the left object (1) named first or second, by "left" or by "right": neither the order
    # of mention nor the side word alone tells which object is on the left, only both together
    "pair": (
        "{ac1} {s1} to the left of {ac2} {s2}",
        "{ac2} {s2} to the right of {ac1} {s1}",
        "the {c1} {s1} is left of the {c2} {s2}",
        "the {c2} {s2} is right of the {c1} {s1}",
        "to the left of the {c2} {s2} is {ac1} {s1}",
        "to the right of the {c1} {s1} you see {ac2} {s2}",
        "the {c2} {s2} has {ac1} {s1} on its left",
        "the {c1} {s1} has {ac2} {s2} on its right",
    ),
    "count": ("{n} {objects}", "a scene with {n} {objects}"),
}
EVAL_TEMPLATES = {
    "single": ("an image showing {ac} {s}",),
    "place": ("{where}, {dist}, stands {ac} {s}",),
    "pair": ("left of the {c2} {s2} there is {ac1} {s1}",),
}
WHERE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
DIST = {"near": "close by", "far": "far away"}


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # small / large
    lateral: str
    depth: str
    x: float
    y: float


@dataclass(frozen=True)
class CaptionScene:
    seed: int
    objects: tuple[SceneObject, ...]
    floor_rgb: tuple[tuple[float, float, float], tuple[float, float, float]]
    wall_rgb: tuple[float, float, float]
    light: float
    camera_height: float
    camera_tilt_deg: float
    camera_yaw_deg: float


FOVY_DEG = 75.0
SIZE_SCALE = {"small": 1.4, "large": 2.0}


def _extent(shape: str, size: str) -> tuple[float, float]:
    """(half width, height) in metres of an object as :func:`_geom` builds it."""
    k = SIZE_SCALE[size]
    half, height = {
        "box": (0.09, 0.18),
        "sphere": (0.08, 0.16),
        "cylinder": (0.07, 0.2),
        "bottle": (0.045, 0.24),
        "basket": (0.12, 0.16),
    }[shape]
    return half * k, height * k


def camera_axes(scene: CaptionScene) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The camera's right and up axes in the world (it looks along up x right)."""
    tilt = math.radians(scene.camera_tilt_deg)
    yaw = math.radians(scene.camera_yaw_deg)
    right = (math.sin(yaw), -math.cos(yaw), 0.0)
    up = (math.sin(tilt) * math.cos(yaw), math.sin(tilt) * math.sin(yaw), math.cos(tilt))
    return right, up


def image_boxes(scene: CaptionScene) -> list[tuple[float, float, float, float] | None]:
    """Per object, its bounding box in the image as (u0, u1, v0, v1) in units of the focal
    length (the image spans +-tan(fovy / 2)), from the corners of its 3-D bounding box through
    the pinhole camera; None when part of it is behind the camera."""
    right, up = camera_axes(scene)
    forward = (  # up x right: MuJoCo cameras look along -z = -(right x up)
        up[1] * right[2] - up[2] * right[1],
        up[2] * right[0] - up[0] * right[2],
        up[0] * right[1] - up[1] * right[0],
    )
    boxes: list[tuple[float, float, float, float] | None] = []
    for o in scene.objects:
        half, height = _extent(o.shape, o.size)
        us, vs = [], []
        for dx in (-half, half):
            for dy in (-half, half):
                for z in (0.0, height):
                    r = (o.x + dx, o.y + dy, z - scene.camera_height)
                    depth = sum(a * b for a, b in zip(r, forward, strict=True))
                    if depth <= 0.1:
                        break
                    us.append(sum(a * b for a, b in zip(r, right, strict=True)) / depth)
                    vs.append(sum(a * b for a, b in zip(r, up, strict=True)) / depth)
        boxes.append((min(us), max(us), min(vs), max(vs)) if len(us) == 8 else None)
    return boxes


def in_view(scene: CaptionScene, margin: float = 0.92, hidden: float = 0.35) -> bool:
    """Whether every object lies wholly inside the image (within ``margin`` of the half field
    of view) and no object has more than ``hidden`` of its image box covered by a nearer one,
    so each caption is about something the image shows."""
    limit = math.tan(math.radians(FOVY_DEG) / 2) * margin
    boxes = image_boxes(scene)
    for box in boxes:
        if box is None or max(abs(v) for v in box) > limit:
            return False
    for i, far in enumerate(scene.objects):
        fb = boxes[i]
        assert fb is not None
        area = (fb[1] - fb[0]) * (fb[3] - fb[2])
        for j, near in enumerate(scene.objects):
            nb = boxes[j]
            assert nb is not None
            if near.x >= far.x:
                continue
            w = min(fb[1], nb[1]) - max(fb[0], nb[0])
            h = min(fb[3], nb[3]) - max(fb[2], nb[2])
            if w > 0 and h > 0 and w * h > hidden * area:
                return False
    return True


def _overlap(objects: Sequence[SceneObject]) -> bool:
    """Whether two objects' footprints come closer than 3 cm."""
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            reach = _extent(a.shape, a.size)[0] + _extent(b.shape, b.size)[0] + 0.03
            if abs(a.x - b.x) < reach and abs(a.y - b.y) < reach:
                return True
    return False


def sample_scene(seed: int) -> CaptionScene:
    """A scene as a pure function of ``seed``: 1-4 objects, placed and drawn again until every
    object is wholly in view, none is hidden behind another and no two touch (so wide, large
    objects near the sides and far objects straight behind near ones are drawn less often)."""
    rng = np.random.default_rng([seed, 424242])
    cells = [(lat, dep) for lat in LATERAL for dep in DEPTH]
    n = int(rng.integers(1, 5))
    while True:
        chosen = [cells[i] for i in rng.choice(len(cells), size=n, replace=False)]
        # never the navigation layout: something in the centre with something behind it
        if ("centre", "near") in chosen and ("centre", "far") in chosen:
            continue
        objects = []
        for lat, dep in chosen:
            objects.append(
                SceneObject(
                    shape=str(rng.choice(SHAPES)),
                    colour=str(rng.choice(list(COLOURS))),
                    size=str(rng.choice(SIZES)),
                    lateral=lat,
                    depth=dep,
                    x=DEPTH[dep] + float(rng.uniform(-0.1, 0.1)),
                    y=LATERAL[lat] * (DEPTH[dep] / DEPTH["near"]) ** 0.5
                    + float(rng.uniform(-0.06, 0.06)),
                )
            )
        objects.sort(key=lambda o: (-o.y, o.x))  # left to right
        floor = tuple(tuple(float(v) for v in rng.uniform(0.25, 0.8, 3)) for _ in range(2))
        scene = CaptionScene(
            seed=seed,
            objects=tuple(objects),
            floor_rgb=floor,  # type: ignore[arg-type]
            wall_rgb=tuple(float(v) for v in rng.uniform(0.3, 0.95, 3)),  # type: ignore[arg-type]
            light=float(rng.uniform(0.45, 1.1)),
            camera_height=float(rng.uniform(0.3, 0.5)),
            camera_tilt_deg=float(rng.uniform(6, 14)),
            camera_yaw_deg=float(rng.uniform(-4, 4)),
        )
        if in_view(scene) and not _overlap(objects):
            return scene


def _geom(o: SceneObject, i: int) -> str:
    k = SIZE_SCALE[o.size]
    rgba = " ".join(f"{v:.3f}" for v in COLOURS[o.colour]) + " 1"
    p = f"{o.x:.3f} {o.y:.3f}"
    if o.shape == "box":
        h = 0.09 * k
        return (
            f'<geom name="o{i}" type="box" pos="{p} {h:.3f}" size="{h:.3f} {h:.3f} {h:.3f}" '
            f'rgba="{rgba}"/>'
        )
    if o.shape == "sphere":
        r = 0.08 * k
        return f'<geom name="o{i}" type="sphere" pos="{p} {r:.3f}" size="{r:.3f}" rgba="{rgba}"/>'
    if o.shape == "cylinder":
        r, h = 0.07 * k, 0.1 * k
        return (
            f'<geom name="o{i}" type="cylinder" pos="{p} {h:.3f}" size="{r:.3f} {h:.3f}" '
            f'rgba="{rgba}"/>'
        )
    if o.shape == "bottle":
        r, h = 0.045 * k, 0.09 * k
        return (
            f'<geom name="o{i}" type="cylinder" pos="{p} {h:.3f}" size="{r:.3f} {h:.3f}" '
            f'rgba="{rgba}"/><geom name="o{i}n" type="cylinder" pos="{p} '
            f'{2 * h + 0.03 * k:.3f}" size="{r * 0.45:.3f} {0.03 * k:.3f}" rgba="{rgba}"/>'
        )
    w, h, t = 0.11 * k, 0.08 * k, 0.01
    x, y = o.x, o.y
    walls = [
        (x, y, t, w, w, t),
        (x + w, y, h, t, w, h),
        (x - w, y, h, t, w, h),
        (x, y + w, h, w, t, h),
        (x, y - w, h, w, t, h),
    ]
    return "".join(
        f'<geom name="o{i}w{j}" type="box" pos="{a:.3f} {b:.3f} {c:.3f}" '
        f'size="{sx:.3f} {sy:.3f} {sz:.3f}" rgba="{rgba}"/>'
        for j, (a, b, c, sx, sy, sz) in enumerate(walls)
    )


def scene_xml(scene: CaptionScene, size: int) -> str:
    f1, f2 = (" ".join(f"{v:.3f}" for v in c) for c in scene.floor_rgb)
    wall = " ".join(f"{v:.3f}" for v in scene.wall_rgb)
    right, up = camera_axes(scene)  # looking along +x, turned by the yaw, tilted down
    axes = " ".join(f"{v:.4f}" for v in (*right, *up))
    lv = scene.light
    geoms = "\n".join(_geom(o, i) for i, o in enumerate(scene.objects))
    return f"""<mujoco model="caption_scene">
  <visual><global offwidth="{max(size, 64)}" offheight="{max(size, 64)}"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="{0.3 * lv:.3f} {0.3 * lv:.3f} {0.3 * lv:.3f}"
               diffuse="{0.25 * lv:.3f} {0.25 * lv:.3f} {0.25 * lv:.3f}" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="ft" type="2d" builtin="checker" rgb1="{f1}" rgb2="{f2}" width="64"
             height="64"/>
    <material name="fm" texture="ft" texrepeat="10 10"/>
  </asset>
  <worldbody>
    <light directional="true" dir="0.2 0.3 -1" castshadow="false"
           diffuse="{0.6 * lv:.3f} {0.6 * lv:.3f} {0.6 * lv:.3f}"/>
    <geom name="floor" type="plane" size="6 6 0.1" material="fm"/>
    <geom name="wall" type="box" pos="3.4 0 0.8" size="0.05 4 0.8" rgba="{wall} 1"/>
    {geoms}
    <camera name="cam" pos="0 0 {scene.camera_height:.3f}" fovy="{FOVY_DEG:g}" xyaxes="{axes}"/>
  </worldbody>
</mujoco>
"""


def _name(o: SceneObject) -> dict[str, str]:
    return {
        "c": o.colour,
        "ac": article(o.colour),
        "s": o.shape,
        "size": o.size,
        "where": WHERE[o.lateral],
        "dist": DIST[o.depth],
    }


LATERAL_RANK = {"left": 0, "centre": 1, "right": 2}


@dataclass(frozen=True)
class Fact:
    """What a caption claims, checkable against any scene's objects (:func:`true_facts`).

    ``kind``: ``single`` (an object's colour and shape, with ``size`` when the caption names
    it), ``place`` (an object at its ``lateral`` / ``depth`` cell), ``pair`` (the object
    ``left`` (colour, shape) is left of the object ``right``), ``count`` (``count`` objects).
    Frozen, so it is hashable and compares by value. ``captions.jsonl`` stores it compactly
    (:meth:`to_json`: ``{"k": "pair", "l": [...], "r": [...]}``)."""

    kind: str
    colour: str = ""
    shape: str = ""
    size: str = ""
    lateral: str = ""
    depth: str = ""
    left: tuple[str, str] | None = None
    right: tuple[str, str] | None = None
    count: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.kind}
        if self.kind == "pair":
            assert self.left is not None and self.right is not None
            out.update(l=list(self.left), r=list(self.right))
        elif self.kind == "count":
            out["n"] = self.count
        else:
            out.update(c=self.colour, s=self.shape)
            if self.size:
                out["z"] = self.size
            if self.kind == "place":
                out.update(lat=self.lateral, dep=self.depth)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Fact:
        return cls(
            kind=obj["k"],
            colour=obj.get("c", ""),
            shape=obj.get("s", ""),
            size=obj.get("z", ""),
            lateral=obj.get("lat", ""),
            depth=obj.get("dep", ""),
            left=tuple(obj["l"]) if "l" in obj else None,  # type: ignore[arg-type]
            right=tuple(obj["r"]) if "r" in obj else None,  # type: ignore[arg-type]
            count=int(obj.get("n", 0)),
        )


def captions(
    scene: CaptionScene, rng: np.random.Generator, per_image: int, held_out: bool = False
) -> tuple[list[str], list[dict]]:
    """``per_image`` captions from the training templates (or the held-out ones), each with
    its *fact*: what it claims, in a form :func:`fact_holds` checks against any scene."""
    families = EVAL_TEMPLATES if held_out else TRAIN_TEMPLATES
    objs = scene.objects
    out: list[str] = []
    facts: list[Fact] = []
    tries = 0
    while len(out) < per_image and tries < 50:
        tries += 1
        kinds = ["single", "place"] + (["pair"] if len(objs) >= 2 else [])
        if "count" in families:
            kinds.append("count")
        kind = str(rng.choice(kinds))
        template = str(rng.choice(families[kind]))
        if kind == "pair":
            i, j = sorted(rng.choice(len(objs), size=2, replace=False))
            a, b = objs[i], objs[j]  # a is left of b (objects are sorted left to right)
            if a.lateral == b.lateral:
                continue
            text = template.format(
                c1=a.colour,
                ac1=article(a.colour),
                s1=a.shape,
                c2=b.colour,
                ac2=article(b.colour),
                s2=b.shape,
            )
            fact = Fact("pair", left=(a.colour, a.shape), right=(b.colour, b.shape))
        elif kind == "count":
            text = template.format(
                n=NUMBERS[len(objs)], objects="object" if len(objs) == 1 else "objects"
            )
            fact = Fact("count", count=len(objs))
        else:
            o = objs[int(rng.integers(len(objs)))]
            text = template.format(**_name(o))
            sized = kind == "single" and "{size}" in template
            fact = Fact(kind, o.colour, o.shape, size=o.size if sized else "")
            if kind == "place":
                fact = replace(fact, lateral=o.lateral, depth=o.depth)
        if text not in out:
            out.append(text)
            facts.append(fact)
    return out, facts


def fact_holds(fact: Fact, objects: Sequence[SceneObject | dict]) -> bool:
    """Whether a caption's fact is true of a scene (its objects, as dataclasses or dicts)."""
    return fact in true_facts(objects)


def true_facts(objects: Sequence[SceneObject | dict]) -> frozenset[Fact]:
    """Every fact a caption can claim that holds for a scene: its object count; each object's
    colour and shape, with and without its size, and with its side and depth; "X left of Y"
    for each two objects whose sides are in that order. A training step checks every caption
    of the batch against every image with it."""
    objs = [o if isinstance(o, dict) else asdict(o) for o in objects]
    facts = [Fact("count", count=len(objs))]
    for o in objs:
        c, s = o["colour"], o["shape"]
        facts += [
            Fact("single", c, s),
            Fact("single", c, s, size=o["size"]),
            Fact("place", c, s, lateral=o["lateral"], depth=o["depth"]),
        ]
        for b in objs:
            if LATERAL_RANK[o["lateral"]] < LATERAL_RANK[b["lateral"]]:
                facts.append(Fact("pair", left=(c, s), right=(b["colour"], b["shape"])))
    return frozenset(facts)


_SWAP = {"left": "right", "right": "left"}


def has_side(fact: Fact) -> bool:
    """Whether a caption's fact names a side (a pair, or a place on the left or right)."""
    return fact.kind == "pair" or (fact.kind == "place" and fact.lateral != "centre")


def mirror_fact(fact: Fact) -> Fact:
    """The fact as it reads in the scene's mirror image: left and right swapped."""
    if fact.kind == "pair":
        return replace(fact, left=fact.right, right=fact.left)
    return replace(fact, lateral=_SWAP.get(fact.lateral, fact.lateral))


def mirror_objects(objects: Sequence[SceneObject | dict]) -> list[dict]:
    """The objects of the scene's mirror image (left and right swapped), left to right."""
    objs = [o if isinstance(o, dict) else asdict(o) for o in objects]
    out = [dict(o, lateral=_SWAP.get(o["lateral"], o["lateral"]), y=-o["y"]) for o in objs]
    return sorted(out, key=lambda o: (-o["y"], o["x"]))


def swap_sides(text: str, fact: Fact) -> tuple[str, Fact] | None:
    """The caption with left and right swapped and its fact ("a red box to the left of a blue
    sphere" -> "... to the right of ..."; "on the left" -> "on the right"); None for a caption
    without a side (single objects, counts, the centre)."""
    if not has_side(fact):
        return None
    return re.sub(r"\b(left|right)\b", lambda m: _SWAP[m.group(1)], text), mirror_fact(fact)


def perturb(text: str, fact: Fact, rng: np.random.Generator) -> tuple[str, Fact] | None:
    """A minimally different caption and its fact: left and right swapped, or one colour,
    shape or count replaced (articles kept grammatical, so only the meaning changes). None
    when the caption has nothing to perturb."""
    kind = fact.kind
    options = []
    if has_side(fact):
        options += ["side", "side"]  # the relation the navigation task needs: weighted up
    if kind == "count":
        options.append("count")
    else:
        options += ["colour", "shape"]
    if not options:
        return None
    choice = str(rng.choice(options))
    if choice == "side":
        return swap_sides(text, fact)
    if choice == "count":
        n = int(rng.choice([k for k in NUMBERS if k != fact.count]))
        out = re.sub(r"\b(one|two|three|four)\b", NUMBERS[n], text)
        out = re.sub(r"\bobjects?\b", "object" if n == 1 else "objects", out)
        return out, replace(fact, count=n)
    slots = [fact.left, fact.right] if kind == "pair" else [(fact.colour, fact.shape)]
    colour, shape = slots[int(rng.integers(len(slots)))]  # type: ignore[misc]
    if choice == "colour":
        other = str(rng.choice([c for c in COLOURS if c != colour]))
        out = re.sub(rf"\b(a|an) {colour}\b", f"{article(other)}", text)
        out = re.sub(rf"\b{colour}\b", other, out)

        def changed(obj: tuple[str, str]) -> tuple[str, str]:
            return (other, obj[1]) if obj[0] == colour else obj
    else:
        other = str(rng.choice([s for s in SHAPES if s != shape]))
        out = re.sub(rf"\b{shape}\b", other, text)

        def changed(obj: tuple[str, str]) -> tuple[str, str]:
            return (obj[0], other) if obj[1] == shape else obj

    if kind == "pair":
        assert fact.left is not None and fact.right is not None
        return out, replace(fact, left=changed(fact.left), right=changed(fact.right))
    colour, shape = (other, shape) if choice == "colour" else (colour, other)
    return out, replace(fact, colour=colour, shape=shape)


def _probe_objects(objects: Sequence[SceneObject | dict]) -> tuple[dict, dict] | None:
    """The first two objects side by side (a left of b), each the only one of its colour and
    shape in the scene: "X to the right of Y" must be false (with a second X on Y's right it
    is true, and the probe would ask a question without an answer)."""
    objs = [o if isinstance(o, dict) else asdict(o) for o in objects]
    counts = Counter((o["colour"], o["shape"]) for o in objs)
    unique = [o for o in objs if counts[o["colour"], o["shape"]] == 1]
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            a, b = sorted((unique[i], unique[j]), key=lambda o: LATERAL_RANK[o["lateral"]])
            if LATERAL_RANK[a["lateral"]] < LATERAL_RANK[b["lateral"]]:
                return a, b
    return None


def left_right_probe(
    objects: Sequence[SceneObject | dict],
) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """For scenes with two objects side by side, X left of Y: two (true, false) pairs,
    ("X to the left of Y", "X to the right of Y") and ("Y to the right of X", "Y to the left
    of X"). Both directions, so a score that merely prefers the word "left" (or "right") gets
    exactly half of them right: only the order of the objects tells the pairs apart."""
    found = _probe_objects(objects)
    if found is None:
        return None
    a, b = found
    x, y = f"{article(a['colour'])} {a['shape']}", f"{article(b['colour'])} {b['shape']}"
    return (
        (f"{x} to the left of {y}", f"{x} to the right of {y}"),
        (f"{y} to the right of {x}", f"{y} to the left of {x}"),
    )


def left_right_probe_held_out(
    objects: Sequence[SceneObject | dict],
) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The same two objects in a phrasing no training template uses: ("left of the Y there is
    X", "left of the X there is Y") and ("right of the X there is Y", "right of the Y there is
    X"). True and false hold the same words, so it asks whether word order is read beyond
    the templates it was trained on."""
    found = _probe_objects(objects)
    if found is None:
        return None
    a, b = found
    x, y = f"{article(a['colour'])} {a['shape']}", f"{article(b['colour'])} {b['shape']}"
    tx, ty = f"the {a['colour']} {a['shape']}", f"the {b['colour']} {b['shape']}"
    return (
        (f"left of {ty} there is {x}", f"left of {tx} there is {y}"),
        (f"right of {tx} there is {y}", f"right of {ty} there is {x}"),
    )
