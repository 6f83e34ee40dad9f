"""Imports run downward: wiring → plugins → server → hub. Plugins see the daemon only through
their narrow context (server.context), never the application's state."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).glob("*.py")):
        for mod in imports(path):
            if mod.startswith(forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


def test_hub_knows_nothing_above_it() -> None:
    assert offenders("hub", ("server", "plugins", "wiring")) == []


def test_server_never_imports_plugins_or_the_composition_root() -> None:
    assert offenders("server", ("plugins", "wiring")) == []


def test_plugins_never_reach_into_the_app_state() -> None:
    assert offenders("plugins", ("wiring", "server.app")) == []


def test_the_composition_root_sits_on_top() -> None:
    assert not (ROOT / "server" / "wiring.py").exists()
    assert "wiring.build_daemon" in imports(ROOT / "pypubsub.py")
