"""Access control through the real daemon: the ACL file, private events, secure topics, reload."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from plugins.acl import hash_password, parse_acl, verify_password
from tests.support import (
    PYTHON,
    ROOT,
    Daemon,
    DaemonFactory,
    auth_header,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
)

# cheap hashes keep the suite fast; the format is what matters here
ARGON = hash_password("bob-pw", "argon2id", cost=1)
BCRYPT = hash_password("dave-pw", "bcrypt", cost=4)


def acl_users() -> dict[str, Any]:
    return {
        "alice": {"password": "alice-pw", "acl": {"foo": ["foo"]}, "topics": ["deploys"]},
        "bob": {"password": ARGON, "acl": {"foobar": ["foo", "bar"]}},
        "carol": {"password": "carol-pw"},
        "dave": {"password": BCRYPT, "acl": {"all": []}, "topics": ["deploys", "releases"]},
    }


def secure_config(port: int, payloaders: list[str] | None = None) -> dict[str, Any]:
    cfg = base_config(port)
    cfg["clients"]["secure_topics"] = ["deploys", "releases"]
    if payloaders is not None:
        cfg["clients"]["payloaders"] = payloaders
    return cfg


async def test_private_events_reach_only_matching_segments(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl_users())
    hdr = {
        "alice": auth_header("alice", "alice-pw"),
        "bob": auth_header("bob", "bob-pw"),
        "carol": auth_header("carol", "carol-pw"),
        "dave": auth_header("dave", "dave-pw"),
        "wrong": auth_header("alice", "not-her-password"),
        "unknown": auth_header("mallory", "x"),
        "garbled": {"Authorization": "Basic !!!notbase64"},
        "anon": {},
    }
    async with (subscribe(d.url, "/foo", hdr["alice"]) as alice,
                subscribe(d.url, "/foo", hdr["bob"]) as bob,
                subscribe(d.url, "/foo", hdr["carol"]) as carol,
                subscribe(d.url, "/foo", hdr["dave"]) as dave,
                subscribe(d.url, "/foo", hdr["wrong"]) as wrong,
                subscribe(d.url, "/foo", hdr["unknown"]) as unknown,
                subscribe(d.url, "/foo", hdr["garbled"]) as garbled,
                subscribe(d.url, "/foo", hdr["anon"]) as anon):
        await wait_subscribers(d.url, 8)
        # refused credentials look exactly like no credentials
        for s in (wrong, unknown, garbled, carol):
            assert s.resp.status == anon.resp.status == 200
            assert sorted(s.resp.headers) == sorted(anon.resp.headers)

        status, _ = await publish(d.url, "/private/foo/bar", {"n": 1})
        assert status == 202
        await publish(d.url, "/private/foo", {"n": 2})
        await publish(d.url, "/foo", {"n": 3})

        ev = await alice.next()
        assert ev["n"] == 1
        assert ev["pubsub_topics"] == ["foo", "bar"]
        assert ev["pubsub_path"] == "/private/foo/bar"
        assert (await alice.next())["n"] == 2
        assert (await alice.next())["n"] == 3
        # bob's segment needs foo AND bar: the second private event is not for him
        assert (await bob.next())["n"] == 1
        assert (await bob.next())["n"] == 3
        # dave's empty segment sees every private event
        assert [(await dave.next())["n"] for _ in range(3)] == [1, 2, 3]
        # everyone else: the public event is the first thing they see
        for s in (carol, wrong, unknown, garbled, anon):
            assert (await s.next())["n"] == 3
            await s.expect_none(0.1)
    assert "authentication failed for user 'alice'" in d.log()
    assert "authentication failed for user 'mallory'" in d.log()


async def test_plaintext_passwords_warned_by_name(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl_users())
    d.wait_log("plaintext password(s) for user(s) alice, carol;")
    assert "bob" not in d.log().split("plaintext password(s)")[1].splitlines()[0]


async def test_secure_topics_need_covering_user(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=secure_config(port), acl=acl_users(), port=port)
    ok = {"alice": auth_header("alice", "alice-pw"), "dave": auth_header("dave", "dave-pw")}
    async with subscribe(d.url, "/deploys") as sub:
        await wait_subscribers(d.url, 1)
        cases = [
            ("/deploys/x", None, 403),                                    # no credentials
            ("/deploys/x", auth_header("alice", "wrong"), 403),           # wrong password
            ("/deploys/x", auth_header("nobody", "alice-pw"), 403),       # unknown user
            ("/deploys/x", auth_header("bob", "bob-pw"), 403),            # no secure topics
            ("/deploys/releases", ok["alice"], 403),                      # covers one of two
            ("/deploys/x", ok["alice"], 202),
            ("/private/deploys/y", ok["alice"], 202),
            ("/deploys/releases", ok["dave"], 202),
            ("/other", None, 202),                                        # not secure at all
        ]
        for path, headers, want in cases:
            status, text = await publish(d.url, path, {"p": path}, headers=headers)
            assert status == want, (path, headers, text)
        got = [(await sub.next())["pubsub_path"] for _ in range(2)]
        assert got == ["/deploys/x", "/deploys/releases"]  # the private one needs an ACL
        await sub.expect_none(0.1)


async def test_credentials_never_bypass_the_allow_list(daemon_factory: DaemonFactory) -> None:
    """0.7.4 let a secure-topic user publish from any address; we require both."""
    port = free_port()
    d = daemon_factory(config=secure_config(port, payloaders=["192.0.2.0/24"]), acl=acl_users(),
                       port=port)
    for path in ("/deploys/x", "/anything"):
        status, _ = await publish(d.url, path, {}, headers=auth_header("dave", "dave-pw"))
        assert status == 403, path


def _write_acl(d: Daemon, acl: dict[str, Any]) -> None:
    tmp = d.acl_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(acl))
    tmp.replace(d.acl_path)


async def test_reload_revokes_and_grants_open_streams(daemon_factory: DaemonFactory) -> None:
    users = acl_users()
    d = daemon_factory(acl=users)
    async with (subscribe(d.url, "/foo", auth_header("alice", "alice-pw")) as alice,
                subscribe(d.url, "/foo", auth_header("carol", "carol-pw")) as carol,
                subscribe(d.url, "/foo", auth_header("bob", "bob-pw")) as bob):
        await wait_subscribers(d.url, 3)
        await publish(d.url, "/private/foo", {"n": 1})
        assert (await alice.next())["n"] == 1

        # alice loses her segment, carol gains one, bob's password changes
        users["alice"]["acl"] = {}
        users["carol"]["acl"] = {"foo": ["foo"]}
        users["bob"] = {"password": "new-bob-pw", "acl": {"foo": ["foo"]}}
        _write_acl(d, users)
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reloaded from")
        assert "3 open stream(s) re-authorised, 3 changed" in d.log()

        await publish(d.url, "/private/foo", {"n": 2})
        await publish(d.url, "/foo", {"n": 3})
        assert (await carol.next())["n"] == 2
        assert (await carol.next())["n"] == 3
        for s in (alice, bob):  # still connected, public events only
            assert (await s.next())["n"] == 3
        await wait_subscribers(d.url, 3)

        # a broken file keeps the previous ACL and says why
        d.acl_path.write_text("carol: {password: carol-pw, acl: [not, a, mapping]}\n")
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reload failed, keeping the previous ACL")
        assert "carol.acl: must be a mapping" in d.log()
        await publish(d.url, "/private/foo", {"n": 4})
        assert (await carol.next())["n"] == 4
        await alice.expect_none(0.1)

        # invalid YAML too
        d.acl_path.write_text("alice: [unclosed\n")
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reload failed, keeping the previous ACL", count=2)
        assert "invalid YAML" in d.log()

    # new connections use the reloaded rights: carol's old rights, the new bob password
    async with (subscribe(d.url, "/foo", auth_header("bob", "new-bob-pw")) as bob2,
                subscribe(d.url, "/foo", auth_header("bob", "bob-pw")) as bob_old):
        await wait_subscribers(d.url, 2)
        await publish(d.url, "/private/foo", {"n": 5})
        await publish(d.url, "/foo", {"n": 6})
        assert (await bob2.next())["n"] == 5
        assert (await bob_old.next())["n"] == 6


async def test_reload_refuses_an_empty_or_missing_file(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl_users())
    async with subscribe(d.url, "/foo", auth_header("alice", "alice-pw")) as alice:
        await wait_subscribers(d.url, 1)
        for n, (breakage, reason) in enumerate((("", "is empty"), ("# nothing here\n", "is empty"),
                                                (None, "not found")), start=1):
            if breakage is None:
                d.acl_path.unlink()
            else:
                d.acl_path.write_text(breakage)
            d.signal(signal.SIGUSR2)
            d.wait_log("ACL reload failed, keeping the previous ACL", count=n)
            assert f"{d.acl_path}: (file): {reason}" in d.log()
            await publish(d.url, "/private/foo", {"n": n})
            assert (await alice.next())["n"] == n  # the previous ACL still holds
        assert "ACL reloaded from" not in d.log()

        # an explicit empty mapping is how an operator removes every user
        d.acl_path.write_text("{}\n")
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reloaded from")
        assert ": 0 user(s); 1 open stream(s) re-authorised, 1 changed" in d.log()
        await publish(d.url, "/private/foo", {"n": 99})
        await publish(d.url, "/foo", {"n": 100})
        assert (await alice.next())["n"] == 100


async def test_broken_acl_file_at_startup_names_file_and_key(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl={"alice": {"acl": {"foo": ["foo"]}}}, start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 2
    assert f"{d.acl_path}: alice.password: is required" in d.log()


async def test_auth_on_head_and_publish_is_harmless(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl_users())
    async with aiohttp.ClientSession() as s, s.head(d.url + "/", headers=auth_header("x", "y")) as r:
        assert r.status == 204
    status, _ = await publish(d.url, "/foo", {}, headers=auth_header("alice", "wrong"))
    assert status == 202


def test_hash_password_command() -> None:
    for scheme, prefix in (("argon2id", "$argon2id$"), ("bcrypt", "$2b$")):
        out = subprocess.run([PYTHON, str(ROOT / "pypubsub.py"), "--hash-password", "--hash-scheme",
                              scheme], input="correct horse\n", capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        assert out.startswith(prefix)
        assert verify_password(out, "correct horse")
        assert not verify_password(out, "correct horse ")
    r = subprocess.run([PYTHON, str(ROOT / "pypubsub.py"), "--hash-password"], input="\n",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""


# -- pure tier: the file parser and the cost of an unknown user ---------------------------
def _shape_of(h: str) -> str:
    if h.startswith("$argon2id$"):
        return h.rsplit("$", 2)[0]
    if h.startswith("$2"):
        return "bcrypt$" + h[4:6]
    return "plaintext"


async def test_unknown_user_verifies_every_scheme_a_known_one_does() -> None:
    """Cost is equal by construction: every login verifies one hash of each shape in the file.

    (The times themselves are measured by bench/auth_bench.py, never asserted here.)
    """
    from plugins.acl import FileAuthenticator

    argon_a = hash_password("a-pw", "argon2id", cost=1)
    argon_b = hash_password("b-pw", "argon2id", cost=2)  # same scheme, other cost: its own shape
    bcrypt4 = hash_password("c-pw", "bcrypt", cost=4)
    bcrypt4_2a = "$2a$" + hash_password("e-pw", "bcrypt", cost=4)[4:]  # same cost as bcrypt4
    doc = {"a": {"password": argon_a}, "b": {"password": argon_b}, "c": {"password": bcrypt4},
           "d": {"password": "plain"}, "e": {"password": bcrypt4_2a}}
    acl = parse_acl(doc, "test.yaml")
    shapes = sorted({_shape_of(u["password"]) for u in doc.values()})
    assert len(shapes) == 4
    unknown_i, unknown = acl.work("nobody")
    assert unknown_i == -1
    assert [_shape_of(h) for h in unknown] == shapes  # a decoy of every shape present
    assert not {h for _, h in acl.decoys.items()} & {u["password"] for u in doc.values()}
    for name, u in doc.items():
        i, hashes = acl.work(name)
        assert [_shape_of(h) for h in hashes] == shapes, name  # the same work as an unknown user
        assert hashes[i] == u["password"]

    auth = FileAuthenticator(acl)
    try:
        assert await auth.authenticate("nobody", "x") is None
        assert dict(auth.verified_shapes) == dict.fromkeys(shapes, 1)
        for name in doc:
            assert await auth.authenticate(name, "wrong") is None
        assert dict(auth.verified_shapes) == dict.fromkeys(shapes, 1 + len(doc))
        for name, pw in (("a", "a-pw"), ("b", "b-pw"), ("c", "c-pw"), ("d", "plain"), ("e", "e-pw")):
            p = await auth.authenticate(name, pw)
            assert p is not None and p.user == name
        # a right password checked against another user's decoy never lets it in
        assert await auth.authenticate("a", "b-pw") is None
        assert await auth.authenticate("nobody", "plain") is None
    finally:
        await auth.close()


def test_single_scheme_file_verifies_one_hash() -> None:
    acl = parse_acl({"u": {"password": ARGON}, "w": {"password": hash_password("w", "argon2id", cost=1)}},
                    "t.yaml")
    assert len(acl.work("u")[1]) == len(acl.work("nobody")[1]) == 1
    assert len(parse_acl({}, "t.yaml").work("nobody")[1]) == 1  # no users: still a comparison


@pytest.mark.parametrize(("doc", "key"), [
    ({"a": "x"}, "a"),
    ({"a": {"password": "p", "acl": {"s": "foo"}}}, "a.acl.s"),
    ({"a": {"password": "p", "topics": {"x": 1}}}, "a.topics"),
    ({"a": {"password": ""}}, "a.password"),
    ([1, 2], "(top level)"),
    ({"a": {"password": "$2b$12$short"}}, "a.password"),
    ({"a": {"password": "$argon2id$v=19$nonsense"}}, "a.password"),
])
def test_acl_file_errors_name_the_key(doc: object, key: str) -> None:
    from server.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_acl(doc, "acl.yaml")
    assert e.value.file == "acl.yaml"
    assert e.value.key == key


def test_shipped_acl_file_defines_no_users() -> None:
    from plugins.acl import load_acl_file

    acl = load_acl_file(str(ROOT / "pypubsub_acl.yaml"))
    assert acl.users == {}


def test_shipped_acl_examples_work_once_uncommented(tmp_path: Path) -> None:
    """What the file tells its owner to do (uncomment a block, hash, drop ``{}``) gives users."""
    from plugins.acl import hash_password, load_acl_file

    text = (ROOT / "pypubsub_acl.yaml").read_text()
    lines = text.split("# Examples", 1)[1].splitlines()[1:]
    body = "\n".join(ln[2:] for ln in lines if ln.startswith("# ") or ln == "#")
    body = body.replace('"$argon2id$v=19$m=65536,t=3,p=4$...your hash..."',
                        repr(hash_password("pw", "argon2id")))
    body = body.replace('"$2b$12$...your hash..."', repr(hash_password("pw", "bcrypt")))
    f = tmp_path / "acl.yaml"
    f.write_text(body)
    acl = load_acl_file(str(f))
    assert set(acl.users) == {"janedoe", "buildbot"} and not acl.plaintext_users
    jane = acl.users["janedoe"]
    assert frozenset({"foo", "bar"}) in jane.acl and "deploys" in jane.topics


async def test_missing_acl_file_then_created_and_reloaded(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(start=False)
    d.acl_path.unlink()
    d.start()
    d.wait_log("not found: no users")
    async with subscribe(d.url, "/foo", auth_header("alice", "alice-pw")) as early:
        await wait_subscribers(d.url, 1)
        _write_acl(d, acl_users())
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reloaded from")
        async with subscribe(d.url, "/foo", auth_header("alice", "alice-pw")) as late:
            await wait_subscribers(d.url, 2)
            await publish(d.url, "/private/foo", {"n": 1})
            await publish(d.url, "/foo", {"n": 2})
            assert (await late.next())["n"] == 1
            # the stream opened while alice did not exist stays anonymous
            assert (await early.next())["n"] == 2


def test_bcrypt_prefix_variants() -> None:
    h = hash_password("pw", "bcrypt", cost=4)
    for prefix in ("$2a$", "$2y$"):
        assert verify_password(prefix + h[4:], "pw")
        assert not verify_password(prefix + h[4:], "px")
    assert not verify_password("$2b$garbage", "pw")
    assert not verify_password("$argon2id$garbage", "pw")


async def test_subscriber_header_can_be_turned_off(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, subscriber_header=False), port=port)
    async with aiohttp.ClientSession() as s, s.head(d.url + "/") as r:
        assert r.status == 204
        assert "X-Subscribers" not in r.headers
