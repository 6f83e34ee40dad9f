#!/usr/bin/env python3
"""The fast lane's cost per request, in-process: µs per publish through ``FastLane.data_received``.

    .venv/bin/python bench/parse_bench.py                 # this tree
    .venv/bin/python bench/parse_bench.py --root OTHER    # another checkout (e.g. an older one)
    .venv/bin/python bench/parse_bench.py --json
    taskset -c 1 .venv/bin/python bench/parse_bench.py --pipeline 1 --access-log   # as the harness
    taskset -c 1 .venv/bin/python bench/parse_bench.py --pipeline 1 --access-log --targets 10000

Two figures, best of ``--repeat`` runs:

* ``publish``: the whole fast-lane path of one plain publish (parse, decide, validate the JSON,
  stamp and route it through the hub with no subscriber, write the 202), for requests arriving
  ``--pipeline`` per read, as the harness's ingest load sends them; ``--targets N``: request
  *i* goes to ``/git/repo(i mod N)`` (every request has a different target, as the harness's
  selective load sends them) instead of one target for all;
* ``head``: the same requests through the parser alone (``--root`` trees with ``parse_head``
  use it; trees with httptools use an ``httptools.HttpRequestParser`` with the fast lane's
  callbacks and ``negotiate()``), i.e. the HTTP parsing cost per request.

The transport is a sink that drops what is written (no socket, no event loop I/O): pure CPU,
measured with ``time.process_time()``. ``--access-log`` writes the access log as the daemon does
by default (buffered lines, here into a stream that drops them); without it the access logger
is at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO, cast

logger = logging.getLogger("bench.parse")

#: requests per timed run: long enough to dwarf timer noise
DEFAULT_REQUESTS = 200_000
#: the harness's ingest request (loadgen.py), with a 256-byte body
BODY = b'{"_bk": 1700000000000000, "seq": 0, "pad": "' + b"x" * 200 + b'"}'
REQUEST = (b"PUT /bench/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class SinkTransport(asyncio.Transport):
    """Accepts writes and drops them."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:  # noqa: ARG002 - dropped
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _timed(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


class _Dropped(io.TextIOBase):
    """A text stream that drops what is written."""

    def write(self, s: str) -> int:
        return len(s)


def selective_requests(targets: int) -> list[bytes]:
    """The harness's selective publishes: one request per target ``/git/repo0`` ... ``/git/repoN-1``."""
    return [b"PUT /git/repo%d HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (i, len(BODY), BODY) for i in range(targets)]


async def run(requests: int, pipeline: int, repeat: int, access_log: bool = False,
              targets: int = 0) -> dict[str, Any]:
    from server import fastlane
    from server.app import STATE, build_app
    from server.config import parse_config
    from server.logs import ACCESS_LOGGER, BufferedLineHandler, setup_logging

    cfg = parse_config({"server": {"port": 1, "backlog": {"size": 0}},
                        "clients": {"payloaders": ["127.0.0.0/8"]}}, "bench.yaml")
    app = build_app(cfg)
    state = app[STATE]
    lane = fastlane.Lane(state, lambda: None)  # type: ignore[arg-type,return-value]
    chunk = REQUEST * pipeline
    reads = requests // pipeline
    if targets:
        one = selective_requests(targets)
        chunks = [b"".join(one[(k * pipeline + j) % targets] for j in range(pipeline))
                  for k in range(targets)]
    else:
        chunks = [chunk]
    chunks = (chunks * (reads // len(chunks) + 1))[:reads]

    def publish() -> None:
        proto = fastlane.FastLane(lane)
        t = SinkTransport()
        proto.connection_made(t)
        for c in chunks:
            proto.data_received(c)
        if t.written != reads * pipeline:
            raise RuntimeError(f"{t.written} answers for {reads * pipeline} requests")
        proto.connection_lost(None)

    res: dict[str, Any] = {"requests": reads * pipeline, "pipeline": pipeline, "access_log": access_log,
                           "targets": targets or 1}
    access = logging.getLogger(ACCESS_LOGGER)
    if access_log:
        setup_logging("info")  # the daemon's default: access lines buffered, written in batches
        for h in access.handlers:
            if isinstance(h, BufferedLineHandler):
                h.stream = cast(TextIO, _Dropped())
    else:
        access.setLevel(logging.WARNING)
    res["publish_us"] = _timed(publish, repeat) / (reads * pipeline) * 1e6
    for h in access.handlers:
        h.flush()

    if hasattr(fastlane, "parse_head"):
        parse_head = fastlane.parse_head

        def head() -> None:
            for buf in chunks:
                while buf:
                    he = buf.find(b"\r\n\r\n")
                    parsed = parse_head(buf[:he])
                    if parsed is None:
                        raise RuntimeError("refused")
                    cl = int(parsed[2][b"content-length"])
                    buf = buf[he + 4 + cl:]
        res["parser"] = "parse_head"
    else:
        import httptools

        from server.negotiate import negotiate

        class Callbacks:
            def __init__(self) -> None:
                self.url = b""
                self.headers: dict[bytes, bytes] = {}
                self.body = b""
                self.parser = httptools.HttpRequestParser(self)

            def on_url(self, url: bytes) -> None:
                self.url = url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers[name.lower()] = value

            def on_headers_complete(self) -> None:
                negotiate(self.parser.get_method(), self.parser.get_http_version(), self.headers)

            def on_body(self, body: bytes) -> None:
                self.body = body

            def on_message_complete(self) -> None:
                self.headers.clear()

        def head() -> None:
            cb = Callbacks()
            for c in chunks:
                cb.parser.feed_data(c)
        res["parser"] = "httptools"
    res["head_us"] = _timed(head, repeat) / (reads * pipeline) * 1e6
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose server/ is measured (default: this one)")
    ap.add_argument("-n", "--requests", type=int, default=DEFAULT_REQUESTS)
    ap.add_argument("--pipeline", type=int, default=16, help="requests per read")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--access-log", action="store_true", help="access log on, as by default")
    ap.add_argument("--targets", type=int, default=0,
                    help="distinct request targets, request i to /git/repo(i mod N) (0: one target)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(a.root.resolve()))
    res = asyncio.run(run(a.requests, a.pipeline, a.repeat, a.access_log, a.targets))
    res["root"] = str(a.root)
    if a.json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        sys.stdout.write(f"{res['root']}: publish {res['publish_us']:.2f} µs/request, "
                         f"head ({res['parser']}) {res['head_us']:.2f} µs/request, "
                         f"{res['pipeline']} per read, {res['targets']} target(s), "
                         f"access log {'on' if res['access_log'] else 'off'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
