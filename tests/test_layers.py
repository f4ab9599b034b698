"""The house's layering: every module imports only modules of its own layer or below, and no
module imports itself back through others. Imports inside functions count too (a lazy import
is still a dependency)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import mobile_vla

# Bottom to top; written once. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors", "io", "hardware"),
    ("robovlms",),  # reads RoboVLMs JSON into plain dicts; config calls it
    ("config",),
    ("data",),
    ("sim",),
    ("models",),  # backbones, heads, the policy and its runtime
    ("training",),  # the trainer, checkpoints, run folders, DAgger
    ("evaluation",),
    ("analysis",),
    ("serving",),
    ("pretraining",),
    ("study",),
    ("cli", "__main__"),
]
ROOT = Path(mobile_vla.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("mobile_vla", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The mobile_vla modules a file imports (a name imported from a package counts as the
    submodule when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("mobile_vla"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mobile_vla")}
    return found


def test_every_module_imports_and_no_import_points_up() -> None:
    known = modules()
    upward = []
    for name, path in sorted(known.items()):
        if name != "mobile_vla.__main__":
            importlib.import_module(name)
        for target in imports(path, known):
            if layer(target) > layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    known = modules()
    graph = {name: imports(path, known) & set(known) for name, path in known.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or nxt == "mobile_vla":  # a package's own __init__
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_without_opengl() -> None:
    """Importing the package probes no OpenGL backend and loads no MuJoCo (the simulator picks
    its backend when an environment is made), so this file's checks run on a machine without
    EGL or OSMesa. In a fresh interpreter whose probe fails loudly."""
    import subprocess
    import sys

    code = """
import importlib, os, sys
os.environ.pop("MUJOCO_GL", None)
import mobile_vla.sim.gl as gl
def probe(backend):
    raise AssertionError(f"probed the {backend} backend at import")
gl._probe = probe
for name in sys.argv[1:]:
    importlib.import_module(name)
assert "mujoco" not in sys.modules, "mujoco imported at import time"
"""
    names = sorted(n for n in modules() if n != "mobile_vla.__main__")
    out = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
