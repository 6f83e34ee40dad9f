"""Every client (Python, Node.js, Ruby) run through its CLI against the real daemon.

Each client runs as a subprocess of its real interpreter and prints one JSON document per event
on stdout. Between it and the daemon a re-chunking relay (tests/relay.py, a real TCP proxy)
merges records into one read, splits them over reads, silences or refuses connections.
A missing interpreter fails these tests: it is not a reason to skip them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.relay import Relay
from tests.support import (
    PYTHON,
    ROOT,
    Daemon,
    await_until,
    base_config,
    free_port,
    put,
    wait_subscribers,
)

CLIENTS = {
    "python": (PYTHON, ROOT / "clients" / "python" / "pypubsub_client.py"),
    "node": ("node", ROOT / "clients" / "nodejs" / "pypubsub-client.js"),
    "ruby": ("ruby", ROOT / "clients" / "ruby" / "pypubsub_client.rb"),
}
LANGS = list(CLIENTS)
#: the clients' test options: quick backoff; silence is noticed after 5 s (pings every 0.25 s)
FAST = ["--backoff", "0.05", "--backoff-cap", "0.3", "--timeout", "5", "-v"]


def command(lang: str) -> list[str]:
    interp, script = CLIENTS[lang]
    exe = shutil.which(interp)
    if exe is None:
        pytest.fail(f"{interp} is not installed: the {lang} client cannot be tested")
    return [exe, str(script)]


class ClientProc:
    """A client's ``listen`` CLI in a subprocess; its stdout parsed as it arrives."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ns(self) -> list[int]:
        return [e["n"] for e in self.events if "n" in e]

    async def wait_n(self, count: int, timeout: float = 10.0) -> list[int]:
        try:
            await await_until(lambda: len(self.ns()) >= count, timeout, f"{count} events")
        except TimeoutError:
            raise AssertionError(f"got {self.ns()}; client stderr:\n{self.stderr()}") from None
        return self.ns()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError(f"client ignored SIGTERM:\n{self.stderr()}") from None
        await self.reader


@contextlib.asynccontextmanager
async def client(lang: str, url: str, tmp_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> AsyncIterator[ClientProc]:
    errfile = tmp_path / f"{lang}-{time.monotonic_ns()}.stderr"
    err = errfile.open("wb")  # a local file: opening it does not block the loop noticeably
    try:
        proc = await asyncio.create_subprocess_exec(
            *command(lang), "listen", url, *FAST, *args, stdout=asyncio.subprocess.PIPE,
            stderr=err, stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **(env or {})})
    finally:
        err.close()
    c = ClientProc(proc, errfile)
    try:
        yield c
    finally:
        await c.stop()


def start(factory: Callable[..., Daemon], acl: dict[str, Any] | None = None,
          **server: Any) -> Daemon:
    """A daemon pinging every 0.25 s."""
    port = free_port()
    return factory(config=base_config(port, ping_interval=0.25, **server), port=port, acl=acl)




# -- reads merged and split ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["merge", "split", "straddle"])
@pytest.mark.parametrize("lang", LANGS)
async def test_merged_and_split_reads(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                      lang: str, mode: str) -> None:
    d = start(daemon_factory)
    async with Relay(d.port, mode) as relay, client(lang, relay.url + "/t", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        for i in range(6):
            await put(d, "/t/u", {"n": i, "text": "ünïcode " * i})
        assert await c.wait_n(6) == list(range(6))
    assert c.events[5]["text"] == "ünïcode " * 5
    assert all("stillalive" not in e for e in c.events)
    if mode == "merge":
        assert relay.stats.merged_writes >= 1
    else:
        assert relay.stats.split_writes >= 1


@pytest.mark.parametrize("lang", LANGS)
async def test_pings_printed_when_asked(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                        lang: str) -> None:
    d = start(daemon_factory)
    async with client(lang, d.url + "/t", tmp_path, "--pings") as c:
        await await_until(lambda: any("stillalive" in e for e in c.events), what="a ping")


@pytest.mark.parametrize("lang", LANGS)
async def test_publish_cli(daemon_factory: Callable[..., Daemon], tmp_path: Path, lang: str) -> None:
    d = start(daemon_factory)
    async with client(lang, d.url + "/cli", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        proc = await asyncio.create_subprocess_exec(
            *command(lang), "publish", d.url + "/cli/x", '{"n": 7, "from": "cli"}',
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
        assert out.decode().startswith("202"), out
        assert await c.wait_n(1) == [7]
    assert c.events[0]["pubsub_topics"] == ["cli", "x"]
    # a refused publish is an error exit
    proc = await asyncio.create_subprocess_exec(
        *command(lang), "publish", d.url + "/a" * 65, '{"n": 1}',
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1, err


# -- dead paths and restarts ------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
async def test_silence_triggers_reconnect(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                          lang: str) -> None:
    d = start(daemon_factory)
    async with Relay(d.port) as relay, \
            client(lang, relay.url + "/t", tmp_path, "--timeout", "1.5") as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await c.wait_n(1)
        relay.stall()
        await await_until(lambda: relay.stats.connections >= 2, 10, "a reconnect after silence")
        await await_until(lambda: relay.stats.stalled_bytes > 0)
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 2})
        assert await c.wait_n(2) == [1, 2]


@pytest.mark.parametrize("lang", LANGS)
async def test_reconnect_after_restart_without_backlog(daemon_factory: Callable[..., Daemon],
                                                       tmp_path: Path, lang: str) -> None:
    d = start(daemon_factory)
    async with client(lang, d.url + "/t", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await c.wait_n(1)
        await asyncio.to_thread(d.restart)
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 2})
        assert await c.wait_n(2) == [1, 2]


# -- resume by cursor (needs the backlog) -------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
async def test_resume_after_dead_path_no_gap_no_duplicate(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, lang: str) -> None:
    """Events sent into a dead connection are replayed after the reconnect, once each."""
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0})
    async with Relay(d.port) as relay, \
            client(lang, relay.url + "/t", tmp_path, "--timeout", "1.5") as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await c.wait_n(1)
        relay.stall()
        relay.block()  # the reconnect waits until the lost events are published
        for i in (2, 3, 4):
            await put(d, "/t", {"n": i})
        await await_until(lambda: relay.stats.stalled_bytes > 0)
        await await_until(lambda: relay.stats.refused >= 1, 10, "a refused reconnect")
        relay.unblock()
        await wait_subscribers(d.url, 1)  # the old stream is gone too (the relay dropped it)
        await put(d, "/t", {"n": 5})
        assert await c.wait_n(5) == [1, 2, 3, 4, 5]
        await put(d, "/t", {"n": 6})
        assert await c.wait_n(6) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("lang", LANGS)
async def test_resume_across_restart_with_persistent_backlog(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, lang: str) -> None:
    """The daemon restarts on its SQLite backlog; the client resumes with no gap, no duplicate."""
    store = tmp_path / "backlog.sqlite"
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0, "storage": str(store)})
    async with Relay(d.port) as relay, client(lang, relay.url + "/t", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        for i in (1, 2, 3):
            await put(d, "/t", {"n": i})
        await c.wait_n(3)
        relay.block()  # the client may reconnect only once events 4-6 were published
        await asyncio.to_thread(d.restart)
        for i in (4, 5, 6):
            await put(d, "/t", {"n": i})
        await await_until(lambda: relay.stats.refused >= 1, 10, "a refused reconnect")
        relay.unblock()
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 7})
        assert await c.wait_n(7) == [1, 2, 3, 4, 5, 6, 7]
    cursors = [e["pubsub_cursor"] for e in c.events if "n" in e]
    assert len(set(cursors)) == 7


@pytest.mark.parametrize("lang", LANGS)
async def test_since_replays_history(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                     lang: str) -> None:
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0})
    await put(d, "/t", {"n": 0, "old": True})
    since = time.time()
    # X-Fetch-Since has one-second resolution: the events to see must be a second newer
    await await_until(lambda: time.time() >= int(since) + 1, 3)
    await put(d, "/t", {"n": 1})
    await put(d, "/t", {"n": 2})
    async with client(lang, d.url + "/t", tmp_path, "--since", str(int(since) + 1)) as c:
        assert await c.wait_n(2) == [1, 2]
        await put(d, "/t", {"n": 3})
        assert await c.wait_n(3) == [1, 2, 3]


# -- auth ---------------------------------------------------------------------------------------
ACL = {"janedoe": {"password": "hunter2", "acl": {"secrets": ["secret"]}}}


@pytest.mark.parametrize("lang", LANGS)
async def test_auth_private_events(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                   lang: str) -> None:
    d = start(daemon_factory, acl=ACL)
    env = {"PUBSUB_PASSWORD": "hunter2"}
    async with client(lang, d.url + "/secret", tmp_path, "--user", "janedoe", env=env) as priv, \
            client(lang, d.url + "/secret", tmp_path) as anon, \
            client(lang, d.url + "/secret", tmp_path, "--user", "janedoe",
                   env={"PUBSUB_PASSWORD": "wrong"}) as wrong:
        await wait_subscribers(d.url, 3)
        await put(d, "/private/secret/x", {"n": 1, "private": True})
        await put(d, "/secret/x", {"n": 2})
        assert await priv.wait_n(2) == [1, 2]
        assert await anon.wait_n(1) == [2]
        assert await wrong.wait_n(1) == [2]
    assert priv.events[0]["pubsub_path"] == "/private/secret/x"
    assert priv.events[0]["pubsub_topics"] == ["secret", "x"]


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("cmd", ["listen", "publish"])
@pytest.mark.parametrize("password", [None, ""])
async def test_user_without_password_stops_with_an_error(daemon_factory: Callable[..., Daemon],
                                                         lang: str, cmd: str,
                                                         password: str | None) -> None:
    """No $PUBSUB_PASSWORD and no terminal: refuse, never fall back to anonymous."""
    d = start(daemon_factory, acl=ACL)
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_PASSWORD"}
    if password is not None:
        env["PUBSUB_PASSWORD"] = password
    extra = ['{"n": 1}'] if cmd == "publish" else []
    proc = await asyncio.create_subprocess_exec(
        *command(lang), cmd, d.url + "/secret", *extra, "--user", "janedoe",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the {lang} client ran on without a password") from None
    assert proc.returncode == 2, (out, err)
    assert b"--user janedoe needs a password" in err and b"PUBSUB_PASSWORD" in err
    assert out == b""


@pytest.mark.parametrize("lang", LANGS)
async def test_unknown_cursor_warns_and_continues_live(daemon_factory: Callable[..., Daemon],
                                                       tmp_path: Path, lang: str) -> None:
    """A restart on a memory backlog forgets every cursor: the client says so and goes on live."""
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0})
    async with client(lang, d.url + "/t", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await c.wait_n(1)
        await asyncio.to_thread(d.restart)
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 2})
        assert await c.wait_n(2) == [1, 2]
        await await_until(lambda: "no longer holds cursor" in c.stderr(), what="the gap warning")


@pytest.mark.parametrize("lang", LANGS)
async def test_long_line_skipped_without_reconnecting(daemon_factory: Callable[..., Daemon],
                                                      tmp_path: Path, lang: str) -> None:
    d = start(daemon_factory)
    async with Relay(d.port, "split", piece=997) as relay, \
            client(lang, relay.url + "/t", tmp_path, "--max-line", "2000") as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await put(d, "/t", {"n": 2, "big": "x" * 5000})
        await put(d, "/t", {"n": 3})
        assert await c.wait_n(2) == [1, 3]
    assert relay.stats.connections == 1
    assert "skipping a record" in c.stderr()


# -- the line buffers on their own, in each language ---------------------------------------------
NODE_UNIT = r"""
const { LineBuffer, Backoff } = require(process.argv[1]);
const out = [];
const run = (pieces, max) => {
  const lb = new LineBuffer(max);
  const lines = [];
  for (const p of pieces) for (const l of lb.feed(Buffer.from(p, 'latin1'))) lines.push(l.toString('latin1'));
  return { lines, skipped: lb.skipped };
};
const data = '{"a":1}\n{"bb":22}\n';
out.push(run([...data], 100));
out.push(run([data + data], 100));
out.push(run(['short\n' + 'x'.repeat(8), 'y'.repeat(8), 'zzz\nok\n', 'x'.repeat(11) + '\nfine\n'], 10));
const b = new Backoff(1, 8);
const d = Array.from({ length: 10 }, () => b.next());
out.push(d.every((x) => x >= 0 && x <= 8) && d[0] <= 1 && d[1] <= 2);
console.log(JSON.stringify(out));
"""

RUBY_UNIT = r"""
require ARGV[0]
run = lambda do |pieces, max|
  lb = PyPubSub::LineBuffer.new(max)
  lines = pieces.flat_map { |p| lb.feed(p) }
  { 'lines' => lines, 'skipped' => lb.skipped }
end
data = %({"a":1}\n{"bb":22}\n)
out = [run.call(data.chars, 100), run.call([data + data], 100),
       run.call(["short\n" + 'x' * 8, 'y' * 8, "zzz\nok\n", 'x' * 11 + "\nfine\n"], 10)]
b = PyPubSub::Backoff.new(1, 8)
d = Array.new(10) { b.next_delay }
out << (d.all? { |x| x >= 0 && x <= 8 } && d[0] <= 1 && d[1] <= 2)
puts JSON.generate(out)
"""


@pytest.mark.parametrize("lang", ["node", "ruby"])
async def test_line_buffer_and_backoff_units(lang: str) -> None:
    exe, script = command(lang)
    code = NODE_UNIT if lang == "node" else RUBY_UNIT
    proc = await asyncio.create_subprocess_exec(
        exe, "-e", code, script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    one_by_one, merged, limited, backoff_ok = json.loads(out)
    assert one_by_one == {"lines": ['{"a":1}', '{"bb":22}'], "skipped": 0}
    assert merged == {"lines": ['{"a":1}', '{"bb":22}'] * 2, "skipped": 0}
    assert limited == {"lines": ["short", "ok", "fine"], "skipped": 2}
    assert backoff_ok is True


# -- TLS ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
async def test_https_with_private_ca(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                     lang: str) -> None:
    """Each client verifies the daemon's certificate against the CA its runtime is told of."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.cert_chain_pems[0].write_to_path(str(cert_pem))
    leaf.private_key_pem.write_to_path(str(key_pem))
    tls_port = free_port()
    d = start(daemon_factory, tls={"port": tls_port, "cert": str(cert_pem), "key": str(key_pem)})
    env = {"SSL_CERT_FILE": str(ca_pem), "NODE_EXTRA_CA_CERTS": str(ca_pem)}
    async with client(lang, f"https://127.0.0.1:{tls_port}/t", tmp_path, env=env) as c:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        assert await c.wait_n(1) == [1]
    # without the CA the certificate is refused, and the client keeps retrying (it says why)
    async with client(lang, f"https://127.0.0.1:{tls_port}/t", tmp_path) as c:
        await await_until(lambda: "certificate" in c.stderr().lower(), what="a certificate error")


@pytest.mark.parametrize("lang", LANGS)
async def test_interrupt_exits_cleanly(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                       lang: str) -> None:
    """Ctrl-C ends a listening client promptly, closing its stream, with no traceback."""
    d = start(daemon_factory)
    async with client(lang, d.url + "/t", tmp_path) as c:
        await wait_subscribers(d.url, 1)
        c.proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(c.proc.wait(), 10)
        await wait_subscribers(d.url, 0)
    assert rc in (0, 130), c.stderr()
    for bad in ("Traceback", "destroyed but it is pending", "Error:"):
        assert bad not in c.stderr()


@pytest.mark.parametrize("lang", LANGS)
async def test_refused_subscription_is_not_retried(daemon_factory: Callable[..., Daemon],
                                                   tmp_path: Path, lang: str) -> None:
    """A 4xx answer is final: the CLI says so and exits 1 instead of retrying forever."""
    d = start(daemon_factory)
    async with client(lang, d.url + "/a" * 65, tmp_path) as c:
        rc = await asyncio.wait_for(c.proc.wait(), 10)
    assert rc == 1, c.stderr()
    assert "400" in c.stderr()
    assert d.log().count("too many topic segments") == 1  # asked once
