"""The command line as a new user meets it: --check-config, config errors, --log-format."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import PYTHON, ROOT


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(ROOT / "pypubsub.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_check_config_accepts_the_shipped_files(tmp_path: Path) -> None:
    p = run("--check-config", "--config", str(ROOT / "pypubsub.yaml"),
            "--acl", str(ROOT / "pypubsub_acl.yaml"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "configuration OK" in p.stderr
    assert "Traceback" not in p.stderr


def test_check_config_reports_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  max_payload_size: 5i\n  stream_buffer: 1\n"
                   "clients:\n  payloaders: [nope]\n")
    p = run("--check-config", "--config", str(cfg), cwd=tmp_path)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if "configuration error" in ln]
    assert len(errors) == 3, p.stderr
    assert any("server.max_payload_size: '5i' is not a size" in ln for ln in errors)
    assert "Traceback" not in p.stderr


def test_errors_in_plugin_sections_are_reported_with_the_others(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  stream_buffer: 1\n"
                   "clients:\n  ldap:\n    uri: http://x\n    user_dn: uid=nobody\n    timeout: 0\n"
                   "    acl:\n      admins: 7\n"
                   "sqs:\n  main:\n    key: k\n    endpoint_url: ftp://x\n")
    for args in (["--check-config"], []):  # the same answer at start-up
        p = run(*args, "--config", str(cfg), cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if "configuration error" in ln]
        keys = ["server.stream_buffer", "clients.ldap.uri", "clients.ldap.base_scope",
                "clients.ldap.user_dn", "clients.ldap.timeout", "clients.ldap.acl.admins",
                "clients.ldap.membership_patterns", "sqs.main.queue", "sqs.main.secret",
                "sqs.main.endpoint_url"]
        for key in keys:
            assert any(f"{key}:" in ln for ln in errors), (key, p.stderr)
        assert len(errors) == len(keys), p.stderr
        assert "Traceback" not in p.stderr


def test_check_config_validates_the_acl_file_too(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 2069\n")
    acl = tmp_path / "acl.yaml"
    acl.write_text("bob:\n  acl: []\n")
    p = run("--check-config", "--config", str(cfg), "--acl", str(acl), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "acl.yaml: bob" in p.stderr


def test_every_error_of_the_acl_file_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 2069\n")
    acl = tmp_path / "acl.yaml"
    acl.write_text("bob:\n  acl: []\n"  # no password
                   "eve:\n  password: $2b$12$short\n"  # a malformed bcrypt hash
                   "amy:\n  password: pw\n  acl:\n    seg: 5\n")  # a segment that is no list
    p = run("--check-config", "--config", str(cfg), "--acl", str(acl), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "configuration error" in ln]
    for key in ("bob.password", "eve.password", "amy.acl.seg"):
        assert any(f"acl.yaml: {key}:" in ln for ln in errors), (key, p.stderr)
    assert len(errors) == 3, p.stderr


def test_check_config_resolves_bind_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  bind: no-such-host.invalid\n")
    p = run("--check-config", "--config", str(cfg), cwd=tmp_path)
    assert p.returncode == 2
    assert "server.bind: 'no-such-host.invalid' cannot be resolved" in p.stderr


def test_help_lists_the_operations_flags(tmp_path: Path) -> None:
    out = run("--help", cwd=tmp_path).stdout
    for flag in ("--config", "--acl", "--log-level", "--log-format", "--check-config",
                 "--hash-password"):
        assert flag in out
