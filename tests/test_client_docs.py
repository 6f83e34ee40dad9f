"""The clients' READMEs: every code example at least parses in its language (real interpreters)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

READMES = {
    "python": ROOT / "clients" / "python" / "README.md",
    "js": ROOT / "clients" / "nodejs" / "README.md",
    "ruby": ROOT / "clients" / "ruby" / "README.md",
}
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str) -> list[str]:
    found = [body for tag, body in FENCE.findall(path.read_text()) if tag == lang]
    assert found, f"no {lang} example in {path}"
    return found


def test_python_examples_compile() -> None:
    for i, code in enumerate(blocks(READMES["python"], "python")):
        compile(code, f"README example {i}", "exec")


@pytest.mark.parametrize(("lang", "check"), [("js", ["node", "--check"]), ("ruby", ["ruby", "-c"])])
def test_examples_parse(tmp_path: Path, lang: str, check: list[str]) -> None:
    exe = shutil.which(check[0])
    if exe is None:
        pytest.fail(f"{check[0]} is not installed")
    for i, code in enumerate(blocks(READMES[lang], lang)):
        f = tmp_path / f"example{i}.{'js' if lang == 'js' else 'rb'}"
        f.write_text(code)
        r = subprocess.run([exe, *check[1:], str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{lang} example {i}:\n{code}\n{r.stderr}"


def test_every_readme_shows_the_cli() -> None:
    for lang, path in READMES.items():
        text = path.read_text()
        assert " listen http://" in text and " publish http://" in text, lang
        assert "PUBSUB_PASSWORD" in text, lang
