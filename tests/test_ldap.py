"""LDAP authentication through the real daemon against a real OpenLDAP slapd."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from plugins.ldap import parse_ldap
from server.config import Section
from server.errors import ConfigError
from tests.ldap_fixture import PEOPLE, Slapd, ldap_config
from tests.support import (
    Daemon,
    DaemonFactory,
    Subscription,
    auth_header,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
    wait_until,
)


@pytest.fixture
def slapd() -> Iterator[Slapd]:
    s = Slapd().start()
    try:
        yield s
    finally:
        s.close()


def ldap_daemon(factory: DaemonFactory, slapd: Slapd, acl: dict[str, Any] | None = None,
                **ldap: Any) -> Daemon:
    port = free_port()
    cfg = base_config(port)
    cfg["clients"]["secure_topics"] = ["deploys"]
    cfg["clients"]["ldap"] = ldap_config(slapd, **ldap)
    return factory(config=cfg, acl=acl or {}, port=port)


async def _seen(sub: Subscription, n: int) -> list[str]:
    return [(await sub.next())["pubsub_path"] for _ in range(n)]


async def test_groups_map_to_segments_both_shapes(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd)
    async with (subscribe(d.url, "/", auth_header("alice", "alice-pw")) as alice,
                subscribe(d.url, "/", auth_header("bob", "bob-pw")) as bob,
                subscribe(d.url, "/", auth_header("carol", "carol-pw")) as carol):
        await wait_subscribers(d.url, 3)
        for path in ("/private/commits/x", "/private/admin", "/private/ops/infra", "/private/ops",
                     "/public"):
            status, _ = await publish(d.url, path, {})
            assert status == 202
        # committers: [commits] (list shape); admins: {adm: [admin], ops: [ops, infra]}
        assert await _seen(alice, 4) == ["/private/commits/x", "/private/admin",
                                         "/private/ops/infra", "/public"]
        assert await _seen(bob, 2) == ["/private/commits/x", "/public"]
        assert await _seen(carol, 1) == ["/public"]  # a valid user in no group
        for s in (alice, bob, carol):
            await s.expect_none(0.1)


#: ``clients.ldap`` exactly as 0.7.4's sample pypubsub.yaml writes it (its stray ':' after the
#: first pattern included): groups found by DN, the user's own entry found by ``uid=%s``, and
#: acl keyed by DN. Key spellings vary in case and spacing; both value shapes are used.
LDAP_074 = """\
server:
  port: {port}
  bind: 127.0.0.1
  backlog:
    size: 0
clients:
  payloaders:
    - 127.0.0.1/32
  oldschoolers:
    - svnwcsub
  secure_topics: ~
  ldap:
    uri: {uri}
    user_dn: uid=%s,ou=people,dc=example,dc=org
    base_scope: dc=example,dc=org
    membership_patterns:
      - member=uid=%s,ou=people,dc=example,dc=org:
      - uid=%s
    acl:
      "CN=Admins, OU=groups,DC=example,DC=org":
          - admin
      "cn=committers,ou=groups,dc=example,dc=org":
          commits: [commits]
      uid=bob,ou=people,dc=example,dc=org:
        - bobs
        - own
      committers:
        - by-cn
"""


async def test_074_config_maps_groups_by_dn(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    port = free_port()
    d = daemon_factory(port=port, acl={}, start=False)
    d.config_path.write_text(LDAP_074.format(port=port, uri=slapd.uri))
    d.start()
    assert "membership_patterns[0]: read as 'member=uid=%s,ou=people,dc=example,dc=org'" in d.log()
    async with (subscribe(d.url, "/", auth_header("alice", "alice-pw")) as alice,
                subscribe(d.url, "/", auth_header("bob", "bob-pw")) as bob,
                subscribe(d.url, "/", auth_header("carol", "carol-pw")) as carol):
        await wait_subscribers(d.url, 3)
        for path in ("/private/admin", "/private/commits/x", "/private/bobs/own", "/private/by-cn",
                     "/public"):
            status, _ = await publish(d.url, path, {})
            assert status == 202
        # alice: admins (a DN key spelt in another case and spacing) and committers (DN, and cn)
        assert await _seen(alice, 4) == ["/private/admin", "/private/commits/x", "/private/by-cn",
                                         "/public"]
        # bob: committers, and his own entry (found by uid=%s, keyed by its DN, list shape)
        assert await _seen(bob, 4) == ["/private/commits/x", "/private/bobs/own", "/private/by-cn",
                                       "/public"]
        assert await _seen(carol, 1) == ["/public"]
        for s in (alice, bob, carol):
            await s.expect_none(0.1)


def test_dn_keys_compare_as_dns() -> None:
    import bonsai

    from plugins.ldap import dn_key

    same = ["cn=syadmins,ou=teams,dc=example,dc=org", "CN=Syadmins, OU=teams ,DC=example,dc=org",
            " cn = syadmins , ou = teams , dc = example , dc = org "]
    keys = {dn_key(bonsai, k) for k in same}
    assert len(keys) == 1 and None not in keys
    assert dn_key(bonsai, "cn=a+uid=b,dc=x") == dn_key(bonsai, "UID=b + cn=A,dc=x")
    assert dn_key(bonsai, "cn=syadmins,ou=other,dc=example,dc=org") not in keys
    assert dn_key(bonsai, "committers") is None  # a plain group name (matched against cn)


async def test_wrong_empty_and_unknown_credentials(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd)
    before = len(slapd.binds())
    creds = [("alice", "wrong"), ("alice", ""), ("nobody", "x"), ("", "alice-pw")]
    async with (subscribe(d.url, "/", auth_header(*creds[0])) as s0,
                subscribe(d.url, "/", auth_header(*creds[1])) as s1,
                subscribe(d.url, "/", auth_header(*creds[2])) as s2,
                subscribe(d.url, "/", auth_header(*creds[3])) as s3,
                subscribe(d.url, "/", auth_header("alice", "alice-pw")) as ok):
        await wait_subscribers(d.url, 5)
        for s in (s0, s1, s2, s3):
            assert s.resp.status == 200
        await publish(d.url, "/private/commits", {})
        await publish(d.url, "/public", {})
        assert await _seen(ok, 2) == ["/private/commits", "/public"]
        for s in (s0, s1, s2, s3):
            assert await _seen(s, 1) == ["/public"]
    # the empty password and the empty username never reached the server: 3 binds, not 5
    binds = slapd.binds()[before:]
    assert sorted(binds) == sorted([f"uid=alice,{PEOPLE}", f"uid=alice,{PEOPLE}", f"uid=nobody,{PEOPLE}"])
    assert "LDAP: wrong credentials for 'alice'" in d.log()


async def test_injection_in_the_username(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd)
    attempts = [
        ("*", "alice-pw"),
        (")(uid=*", "alice-pw"),
        ("alice)(uid=*", "alice-pw"),
        ("alice,ou=x", "x-pw"),    # unescaped, this binds as uid=alice,ou=x,... (an admin)
        (",ou=x", "x-pw"),
        ("eve*", "eve-pw"),        # a real user: unescaped, (memberUid=eve*) matches evelyn
    ]
    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(subscribe(d.url, "/", auth_header(u, p)))
                  for u, p in attempts]
        evelyn = await stack.enter_async_context(
            subscribe(d.url, "/", auth_header("evelyn", "evelyn-pw")))
        await wait_subscribers(d.url, len(attempts) + 1)
        await publish(d.url, "/private/admin", {})
        await publish(d.url, "/public", {})
        assert await _seen(evelyn, 2) == ["/private/admin", "/public"]
        for s in opened:
            assert await _seen(s, 1) == ["/public"]
    binds = slapd.binds()
    # the DN carried the username escaped, never as DN syntax
    assert f"uid=alice\\,ou\\=x,{PEOPLE}" in binds or f"uid=alice\\2Cou\\3Dx,{PEOPLE}" in binds
    assert f"uid=alice,ou=x,{PEOPLE}" not in binds
    # the filter carried eve* escaped (slapd logs filters in its stats)
    assert "memberUid=eve\\2A" in slapd.log() or "memberUid=eve\\2a" in slapd.log()
    # eve* did bind (a real user) but got no group, so publishing a secure topic stays closed
    status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("eve*", "eve-pw"))
    assert status == 403


async def test_ldap_grants_secure_topics(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd)
    status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("alice", "alice-pw"))
    assert status == 202
    status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("bob", "bob-pw"))
    assert status == 403
    status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("alice", "wrong"))
    assert status == 403


async def test_file_users_come_first(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    """As in 0.7.4: a user named in the ACL file is decided by the file, never by LDAP."""
    d = ldap_daemon(daemon_factory, slapd, acl={"alice": {"password": "file-pw", "acl": {"c": ["commits"]}}})
    before = len(slapd.binds())
    async with (subscribe(d.url, "/", auth_header("alice", "alice-pw")) as ldap_pw,
                subscribe(d.url, "/", auth_header("alice", "file-pw")) as file_pw,
                subscribe(d.url, "/", auth_header("bob", "bob-pw")) as bob):
        await wait_subscribers(d.url, 3)
        await publish(d.url, "/private/commits", {})
        await publish(d.url, "/public", {})
        assert await _seen(file_pw, 2) == ["/private/commits", "/public"]
        assert await _seen(bob, 2) == ["/private/commits", "/public"]
        assert await _seen(ldap_pw, 1) == ["/public"]
    assert slapd.binds()[before:] == [f"uid=bob,{PEOPLE}"]


async def test_cache_hits_then_expires(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd, cache_ttl=1)
    before = len(slapd.binds())
    hdr = auth_header("bob", "bob-pw")

    async def connect_once() -> None:
        async with subscribe(d.url, "/", hdr) as s:
            assert s.resp.status == 200

    # 20 concurrent connects by one user: one bind (in-flight look-ups are shared)
    await asyncio.gather(*(connect_once() for _ in range(20)))
    await connect_once()
    assert len(slapd.binds()) - before == 1
    # and a different password is a different cache entry
    async with subscribe(d.url, "/", auth_header("bob", "other")):
        pass
    wait_until(lambda: len(slapd.binds()) - before == 2, 5, "a bind for the other password")

    # after the TTL, the next connect binds again
    end = asyncio.get_running_loop().time() + 10
    while len(slapd.binds()) - before < 3:
        assert asyncio.get_running_loop().time() < end, "the cache never expired"
        await connect_once()
    await publish(d.url, "/public", {})


async def test_slapd_down_fails_closed_and_daemon_keeps_serving(daemon_factory: DaemonFactory,
                                                                slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd, cache_ttl=0)
    async with subscribe(d.url, "/", auth_header("alice", "alice-pw")) as alice:
        await wait_subscribers(d.url, 1)
        slapd.stop()
        async with subscribe(d.url, "/", auth_header("bob", "bob-pw")) as bob:
            await wait_subscribers(d.url, 2)
            d.wait_log("LDAP: cannot authenticate 'bob', refusing (fail closed)")
            status, _ = await publish(d.url, "/private/commits", {})
            assert status == 202
            await publish(d.url, "/public", {})
            # the stream authorised before the outage keeps its rights; bob got none
            assert await _seen(alice, 2) == ["/private/commits", "/public"]
            assert await _seen(bob, 1) == ["/public"]
        # secure publishing fails closed too
        status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("alice", "alice-pw"))
        assert status == 403

        # a directory that accepts connections but never answers: bounded by the timeout
        slapd.start()
        slapd.pause()
        try:
            t0 = asyncio.get_running_loop().time()
            status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("alice", "alice-pw"))
            took = asyncio.get_running_loop().time() - t0
            assert status == 403
            assert took < 5, took  # clients.ldap.timeout is 1 s
        finally:
            slapd.resume()
        # once it answers again, so do we (failures were not cached)
        status, _ = await publish(d.url, "/deploys/x", {}, headers=auth_header("alice", "alice-pw"))
        assert status == 202
    assert d.log().count("refusing (fail closed)") >= 3


async def test_sigusr2_keeps_ldap_streams(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    d = ldap_daemon(daemon_factory, slapd, acl={"zed": {"password": "z"}})
    async with subscribe(d.url, "/", auth_header("bob", "bob-pw")) as bob:
        await wait_subscribers(d.url, 1)
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reloaded from")
        await publish(d.url, "/private/commits", {})
        assert await _seen(bob, 1) == ["/private/commits"]


async def test_bad_ldap_config_names_the_key(daemon_factory: DaemonFactory, slapd: Slapd) -> None:
    port = free_port()
    cfg = base_config(port)
    cfg["clients"]["ldap"] = ldap_config(slapd, user_dn="uid=alice,ou=people")
    d = daemon_factory(config=cfg, port=port, start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 2
    assert "clients.ldap.user_dn: must contain %s exactly once" in d.log()


@pytest.mark.parametrize(("change", "key"), [
    ({"uri": "http://x"}, "clients.ldap.uri"),
    ({"base_scope": None}, "clients.ldap.base_scope"),
    ({"membership_patterns": ["(cn=x)"]}, "clients.ldap.membership_patterns[0]"),
    ({"acl": {"g": "topic"}}, "clients.ldap.acl.g"),
    ({"acl": {"g": {"seg": "topic"}}}, "clients.ldap.acl.g.seg"),
    ({"timeout": 0}, "clients.ldap.timeout"),
])
def test_ldap_config_errors(change: dict[str, Any], key: str) -> None:
    raw: dict[str, Any] = {"uri": "ldap://h", "user_dn": "uid=%s,o=x", "base_scope": "o=x",
                           "membership_patterns": ["(member=%s)"], "acl": {"g": ["t"]}}
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        parse_ldap(Section(raw, "c.yaml", "clients.ldap"))
    assert e.value.key == key


def test_ldap_acl_shapes() -> None:
    cfg = parse_ldap(Section({"uri": "ldap://h", "user_dn": "uid=%s,o=x", "base_scope": "o=x",
                              "membership_patterns": ["(member=%s)"],
                              "acl": {"a": ["t1", "t2"], "b": {"s1": ["x"], "s2": ["y", "z"]}}},
                             "c.yaml", "clients.ldap"))
    assert cfg.acl["a"] == frozenset({frozenset({"t1", "t2"})})
    assert cfg.acl["b"] == frozenset({frozenset({"x"}), frozenset({"y", "z"})})
