"""systemd/pypubsub.service: systemd itself must accept it, and it must keep its promises.

``systemd-analyze verify`` checks that ExecStart's program exists, so the unit is verified from
a copy whose /opt/pypubsub paths point at this checkout. systemd-analyze is a test dependency
(scripts/install.sh --dev installs it): these tests fail, never skip, when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "pypubsub.service"
INSTALL_DIR = "/opt/pypubsub"
EXEC_START = (f"{INSTALL_DIR}/.venv/bin/python {INSTALL_DIR}/pypubsub.py "
              "--config /etc/pypubsub/pypubsub.yaml --acl /etc/pypubsub/pypubsub_acl.yaml")
#: `systemd-analyze security` exposure, in tenths (0 = locked down, 100 = unconfined). The unit
#: scores 1.1; a network daemon cannot go much lower without PrivateNetwork.
MAX_EXPOSURE = 20


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: install systemd (scripts/install.sh --dev)"
    return path


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, in order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with its install paths pointing at this checkout and its interpreter."""
    text = UNIT.read_text()
    text = text.replace(f"{INSTALL_DIR}/.venv/bin/python", sys.executable)
    text = text.replace(f"{INSTALL_DIR}/pypubsub.py", str(ROOT / "pypubsub.py"))
    assert INSTALL_DIR not in directives(text)["ExecStart"][0]
    unit = tmp_path / "pypubsub.service"
    unit.write_text(text)
    return unit


def test_systemd_analyze_verify_accepts_the_unit(local_unit: Path) -> None:
    proc = subprocess.run([systemd_analyze(), "verify", str(local_unit)],
                          capture_output=True, text=True, timeout=60)
    # a misspelt key is only a warning (exit 0): any output at all fails the test
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_systemd_analyze_security_exposure_stays_low(local_unit: Path) -> None:
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true",
                           f"--threshold={MAX_EXPOSURE}", "--no-pager", str(local_unit)],
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert score, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exposure {score.group(1)} is above {MAX_EXPOSURE / 10}:\n{proc.stdout}"


def test_unit_runs_the_documented_command_as_its_own_user() -> None:
    d = directives(UNIT.read_text())
    assert d["ExecStart"] == [EXEC_START]
    assert d["User"] == ["pypubsub"]
    assert d["Group"] == ["pypubsub"]
    assert d["StateDirectory"] == ["pypubsub"]
    assert d["WorkingDirectory"] == ["/var/lib/pypubsub"]


def test_unit_reloads_with_sigusr2_and_stops_with_sigterm() -> None:
    d = directives(UNIT.read_text())
    assert d["ExecReload"] == ["/bin/kill -USR2 $MAINPID"]
    assert d["KillSignal"] == ["SIGTERM"]
    assert d["Restart"] == ["on-failure"]
    assert float(d["TimeoutStopSec"][0]) > 3  # above the daemon's default shutdown_grace


def test_unit_is_hardened() -> None:
    d = directives(UNIT.read_text())
    expected = {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for key, value in expected.items():
        assert d.get(key, [None])[0] == value, key
    assert "@system-service" in d["SystemCallFilter"]


def test_unit_uses_the_notify_protocol_and_a_large_fd_limit() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30s"]
    assert int(d["LimitNOFILE"][0]) >= 524288
    assert "AF_UNIX" in d["RestrictAddressFamilies"][0]  # the notify socket
    # the drain (server.shutdown_grace 3 s: about 6 s at most) fits well within the stop timeout
    assert float(d["TimeoutStopSec"][0]) >= 4 * 3
