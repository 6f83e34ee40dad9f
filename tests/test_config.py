"""Unit tests of configuration parsing: every key, defaults, and errors naming file and key."""

from __future__ import annotations

import logging
from pathlib import Path

import netaddr
import pytest

from server.config import load_config, parse_config, parse_duration, parse_size
from server.errors import ConfigError


def test_durations_and_sizes() -> None:
    assert [parse_duration(x) for x in ("45s", "30m", "12h", "7d", 10, "1.5h", "2w")] == [
        45, 1800, 43200, 604800, 10, 5400, 1209600]
    assert [parse_size(x) for x in (102400, "100KiB", "4MiB", "1M")] == [102400, 102400, 4 << 20, 10**6]
    for bad in ("soon", "-1s", True, "5y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_embedded_defaults() -> None:
    c = load_config(None)
    assert c.server.port == 2069 and c.server.bind == ("127.0.0.1",)
    assert c.server.max_payload_size == 102400 and c.server.backlog.size == 0
    assert netaddr.IPAddress("127.0.0.1") in c.clients.payloaders
    assert netaddr.IPAddress("::1") in c.clients.payloaders


def test_every_074_key(tmp_path: Path) -> None:
    cert, key, chain = (tmp_path / n for n in ("c.pem", "k.pem", "ch.pem"))
    for p in (cert, key, chain):
        p.write_text("x")
    c = parse_config({
        "server": {"port": 8080, "bind": "0.0.0.0", "max_payload_size": 2048,
                   "backlog": {"size": 100, "max_age": "12h", "storage": str(tmp_path / "b.db")},
                   "tls": {"port": 8443, "cert": str(cert), "key": str(key), "chain": str(chain)}},
        "clients": {"payloaders": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.1"],
                    "oldschoolers": ["svnwcsub", "svnpubsub"], "secure_topics": ["infra"],
                    "ldap": {"uri": "ldap://x"}},
        "sqs": {"q": {"queue": "name", "region": "us-east-1"}},
    }, "f.yaml")
    assert c.server.port == 8080 and c.server.bind == ("0.0.0.0",)
    assert c.server.backlog.max_age == 43200 and c.server.backlog.storage == tmp_path / "b.db"
    assert c.server.tls is not None and c.server.tls.port == 8443 and c.server.tls.chain == chain
    assert netaddr.IPAddress("2001:db8::1") in c.clients.payloaders
    assert netaddr.IPAddress("192.168.1.2") not in c.clients.payloaders
    assert c.clients.oldschoolers == ("svnwcsub", "svnpubsub")
    assert c.clients.secure_topics == frozenset({"infra"})
    assert c.clients.ldap is not None and c.sqs is not None


def test_bench_style_nulls_are_accepted() -> None:
    c = parse_config({"server": {"port": 1, "backlog": {"size": 0, "max_age": 0}},
                      "clients": {"payloaders": ["127.0.0.0/8"], "oldschoolers": [],
                                  "secure_topics": None}}, "f.yaml")
    assert c.clients.secure_topics == frozenset() and c.server.backlog.max_age == 0


@pytest.mark.parametrize(("data", "key"), [
    ({"server": {"port": "eighty"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"max_payload_size": "lots"}}, "server.max_payload_size"),
    ({"server": {"backlog": {"max_age": "soon"}}}, "server.backlog.max_age"),
    ({"server": {"backlog": {"size": -1}}}, "server.backlog.size"),
    ({"server": {"backlog": "big"}}, "server.backlog"),
    ({"clients": {"payloaders": ["10.0.0.0/33"]}}, "clients.payloaders[0]"),
    ({"clients": {"payloaders": ["not-an-ip"]}}, "clients.payloaders[0]"),
    ({"server": {"tls": {"port": 443, "cert": "/nonexistent.pem", "key": "/nonexistent.key"}}},
     "server.tls.cert"),
    ({"server": {"tls": {"port": 443}}}, "server.tls.cert"),
    ({"server": {"ping_interval": 0}}, "server.ping_interval"),
    ({"server": {"subscriber_header": "maybe"}}, "server.subscriber_header"),
    ({"server": {"max_connections": -1}}, "server.max_connections"),
    ({"server": {"max_connections": "many"}}, "server.max_connections"),
    ({"server": {"max_connections_per_ip": 1.5}}, "server.max_connections_per_ip"),
    ({"server": {"header_timeout": 0}}, "server.header_timeout"),
    ({"server": {"header_timeout": "soon"}}, "server.header_timeout"),
    (["a", "list"], "(top level)"),
])
def test_errors_name_file_and_key(data: object, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "conf.yaml")
    assert e.value.file == "conf.yaml" and e.value.key == key
    assert str(e.value).startswith(f"conf.yaml: {key}: ")


def test_unknown_keys_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse_config({"server": {"prot": 1}, "extra": 2}, "f.yaml")
    text = caplog.text
    assert "f.yaml: unknown configuration key server.prot" in text
    assert "unknown configuration key extra" in text


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_limits() -> None:
    c = parse_config({"server": {"max_connections": 5000, "max_connections_per_ip": 50,
                                 "header_timeout": "10s"}}, "conf.yaml")
    assert (c.server.max_connections, c.server.max_connections_per_ip, c.server.header_timeout) == (
        5000, 50, 10.0)
    d = load_config(None).server
    assert (d.max_connections, d.max_connections_per_ip, d.header_timeout) == (0, 0, 30.0)


def test_a_bad_size_unit_is_a_config_error() -> None:
    for bad in ("5i", "5q", "10 kilo", "1.5M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"max_payload_size": "5i"}}, "f.yaml")
    assert e.value.key == "server.max_payload_size" and "'5i'" in str(e.value)


def test_every_error_of_a_file_is_reported_at_once() -> None:
    from server.config import ConfigErrors

    with pytest.raises(ConfigErrors) as e:
        parse_config({"server": {"port": "x", "max_payload_size": "5i", "ping_interval": 0,
                                 "admin": {"port": 70000}, "log_format": "xml"},
                      "clients": {"payloaders": ["10.0.0.0/8", "nope", "also bad"]}}, "f.yaml")
    keys = [err.key for err in e.value.errors]
    assert sorted(keys) == sorted([
        "server.port", "server.max_payload_size", "server.ping_interval", "server.admin.port",
        "server.log_format", "clients.payloaders[1]", "clients.payloaders[2]"])
    assert all(str(err).startswith("f.yaml: ") for err in e.value.errors)
    assert len(str(e.value).splitlines()) == len(keys)


def test_admin_listener_and_log_format_keys() -> None:
    c = parse_config({}, "f.yaml")
    assert c.server.admin.port is None and c.server.log_format == "text"
    c = parse_config({"server": {"admin": {"port": 2070}, "log_format": "json"}}, "f.yaml")
    assert c.server.admin.port == 2070 and c.server.admin.bind == ("127.0.0.1",)
    assert c.server.log_format == "json"
    c = parse_config({"server": {"admin": {"port": 0, "bind": ["::1", "127.0.0.1"]}}}, "f.yaml")
    assert c.server.admin.port == 0 and c.server.admin.bind == ("::1", "127.0.0.1")


def test_empty_payloaders_warn_that_nobody_can_publish(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse_config({"clients": {"payloaders": []}}, "f.yaml")
    assert "f.yaml: clients.payloaders is empty: nobody can publish" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_config({"clients": {"payloaders": ["127.0.0.1"]}}, "f.yaml")
    assert "nobody can publish" not in caplog.text


def test_an_unresolvable_bind_names_the_key_and_the_value() -> None:
    from server.run import check_binds

    c = parse_config({"server": {"bind": "no-such-host.invalid",
                                 "admin": {"port": 1, "bind": ["127.0.0.1", "nor-this.invalid"]}}},
                     "f.yaml")
    errs = [str(e) for e in check_binds(c)]
    assert errs[0].startswith("f.yaml: server.bind: 'no-such-host.invalid' cannot be resolved")
    assert errs[1].startswith("f.yaml: server.admin.bind[1]: 'nor-this.invalid' cannot be resolved")
    assert check_binds(parse_config({"server": {"bind": ["localhost", "::1", "*"]}}, "f.yaml")) == []
