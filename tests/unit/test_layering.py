"""The house keeps its floors: shared code at the bottom, services beside each other, launchers on top.

Floors, from the ground up (docs/architecture.md, "Where things live"):

1. ``specdec`` - the shared ground: the sampler, the contracts, the engine, server plumbing.
2. ``draft_service``, ``target_service``, ``orchestrator`` - the three services; each stands on the
   ground only, never on another service (they talk over the wire).
3. ``cli`` - the `specdec` command and the local stack, which starts the services as processes.
4. ``bench`` - the benchmark, which starts the stack.

Every ``import`` counts, at module level or inside a function. A violation fails the test with the file,
line and import, so the layering stays true as the code grows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR = {"specdec": 1, "draft_service": 2, "target_service": 2, "orchestrator": 2, "cli": 3, "bench": 4}


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``; relative imports resolve to ``package``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return found


def violations() -> list[str]:
    found = []
    for package, floor in FLOOR.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if package == "specdec" and path.parent.name == "v1":  # generated from protos/
                continue
            for line, imported in _imports(path, package):
                if imported not in FLOOR or imported == package:
                    continue
                upward = FLOOR[imported] > floor
                sideways = FLOOR[imported] == floor  # another service
                if upward or sideways:
                    kind = "another service" if sideways else f"floor {FLOOR[imported]} from floor {floor}"
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} ({kind})")
    return found


def test_no_package_imports_upward_or_into_another_service() -> None:
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control: a ground module importing a service, and a service importing another."""
    for package, text in (("specdec", "from orchestrator import loop\n"), ("draft_service", "import orchestrator\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "bad.py").write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert violations() == [
        "specdec/bad.py:1 imports orchestrator (floor 2 from floor 1)",
        "draft_service/bad.py:1 imports orchestrator (another service)",
    ]
