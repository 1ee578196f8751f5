"""Arrows point inward: no library module imports a CLI module; the core imports no subsystem;
subsystems import no other subsystem."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmsmith"
SUBSYSTEMS = ("distill", "debias", "dialog")
# The package namespace names its subpackages (lazily, and for type checkers) so that
# `from lmsmith import distill` reads as API; no other core module may import a subsystem.
CORE_EXCEPTIONS = {"__init__.py": set(SUBSYSTEMS)}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC), imports(path)


def is_cli(name: str) -> bool:
    return name == "lmsmith.cli" or (name.startswith("lmsmith.") and name.endswith(".cli"))


def test_no_library_module_imports_a_cli():
    bad = [
        f"{rel} imports {m}"
        for rel, mods in modules()
        if rel.name != "cli.py"
        for m in mods
        if is_cli(m)
    ]
    assert not bad, bad


def test_subsystem_clis_do_not_import_the_top_level_cli():
    bad = [
        str(rel) for rel, mods in modules() if rel.parts[0] in SUBSYSTEMS and "lmsmith.cli" in mods
    ]
    assert not bad, bad


def test_core_imports_no_subsystem():
    bad = []
    for rel, mods in modules():
        if rel.parts[0] in SUBSYSTEMS or rel.name == "cli.py":
            continue  # the core: lmsmith/*.py (but cli.py), data/, metrics/
        allowed = CORE_EXCEPTIONS.get(str(rel), set())
        for m in mods:
            parts = m.split(".")
            if len(parts) > 1 and parts[0] == "lmsmith" and parts[1] in SUBSYSTEMS:
                if parts[1] not in allowed:
                    bad.append(f"{rel} imports {m}")
    assert not bad, bad


def test_subsystems_import_no_other_subsystem():
    bad = []
    for rel, mods in modules():
        if rel.parts[0] not in SUBSYSTEMS:
            continue
        for m in mods:
            parts = m.split(".")
            if len(parts) > 1 and parts[0] == "lmsmith" and parts[1] in SUBSYSTEMS:
                if parts[1] != rel.parts[0]:
                    bad.append(f"{rel} imports {m}")
    assert not bad, bad
