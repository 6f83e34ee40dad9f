"""``pip install .`` gives a ``pypubsub`` command that runs the daemon outside the checkout."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

from tests.support import HOST, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_top_level_module_and_package_is_installed() -> None:
    st = PYPROJECT["tool"]["setuptools"]
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert set(st["py-modules"]) == modules
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert set(st["packages"]) == packages
    assert PYPROJECT["project"]["scripts"]["pypubsub"] == "pypubsub:main"


def test_pip_install_gives_a_working_pypubsub_command(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", "build", "*.egg-info", ".*_cache", "tests", "bench",
        "clients", "node_modules"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, timeout=300, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from the test environment (no download here); the project itself
    # from the wheel only
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next(wheels.glob("pypubsub-*.whl"))
    with zipfile.ZipFile(wheel) as z:  # the live page's files, the browser client a real copy
        names = set(z.namelist())
        assert {"server/static/page.html", "server/static/page.js"} <= names
        assert b"class PubSubSubscription" in z.read("server/static/pypubsub.js")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300, capture_output=True)
    cmd = venv / "bin" / "pypubsub"
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([str(cmd), "--version"], cwd=work, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("PyPubSub "), out.stderr
    helptext = subprocess.run([str(cmd), "--help"], cwd=work, capture_output=True, text=True,
                              timeout=60).stdout
    for flag in ("--config", "--acl", "--log-level", "--log-format", "--check-config", "--hash-password"):
        assert flag in helptext
    port = free_port()
    (work / "pypubsub.yaml").write_text(f"server:\n  port: {port}\n  bind: {HOST}\n")
    log = work / "log"
    with open(log, "wb") as f:
        p = subprocess.Popen([str(cmd)], cwd=work, stderr=f, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: "listening on" in log.read_text() or p.poll() is not None, 30, "daemon")
        assert f"listening on http://{HOST}:{port}" in log.read_text(), log.read_text()
        # it runs from the installed package, not from a checkout
        where = subprocess.run([str(vpy), "-c", "import server; print(server.__file__)"], cwd=work,
                               capture_output=True, text=True, check=True).stdout
        assert where.startswith(purelib)
        page = urllib.request.Request(f"http://{HOST}:{port}/t", headers={"Accept": "text/html"})
        with urllib.request.urlopen(page, timeout=10) as r:  # the live page, from the wheel
            assert b"PubSubSubscription" in r.read()
    finally:
        p.terminate()
        assert p.wait(15) == 0
