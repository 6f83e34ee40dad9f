"""The publishers' allow-list (``clients.payloaders``): one IP library (netaddr) for all of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server.auth import AllowList
from server.config import parse_config
from server.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def allow(*nets: str) -> AllowList:
    return AllowList(parse_config({"clients": {"payloaders": list(nets)}}, "c.yaml").clients.payloaders)


def test_peers_matched_as_addresses() -> None:
    a = allow("10.0.0.1/24", "2001:db8::/32", "127.0.0.1")
    assert a.allows("10.0.0.200") and not a.allows("10.0.1.1")  # host bits in the CIDR are fine
    assert a.allows("::ffff:10.0.0.7")  # IPv4-mapped, from a dual-stack socket
    assert a.allows("2001:db8::1") and not a.allows("2001:db9::1")
    assert a.allows("127.0.0.1") and not a.allows("127.0.0.2")
    for bad in ("", None, "garbage", "10.0.0", "fe80::1%eth0%x", "300.1.1.1"):
        assert not a.allows(bad)
    assert allow("fe80::/10").allows("fe80::1%eth0")  # the zone is not part of the address


@pytest.mark.parametrize("entry", ["10", "1.2.3", "256.0.0.1", "127.0.0.1/33", "1.2.3.4/", "x"])
def test_bad_cidrs_name_the_key(entry: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"clients": {"payloaders": ["127.0.0.1", entry]}}, "c.yaml")
    assert e.value.key == "clients.payloaders[1]"


def test_one_ip_library() -> None:
    """The daemon parses addresses with netaddr only (never the stdlib's ipaddress as well)."""
    for path in [*ROOT.glob("server/*.py"), *ROOT.glob("plugins/*.py"), *ROOT.glob("hub/*.py"),
                 ROOT / "wiring.py", ROOT / "pypubsub.py"]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert "ipaddress" not in names, f"{path.relative_to(ROOT)} imports ipaddress"
