#!/usr/bin/env python3
"""Redis' own cost of the cluster log's append script, compared between checkouts.

    taskset -c 1 .venv/bin/python bench/script_cost.py --root /tmp/base --root .

Starts one ``redis-server`` (AOF, ``appendfsync always``, pinned to ``--redis-cpu``) and sends it
each checkout's script calls exactly as its :class:`plugins.backlog_redis.RedisLog` packs them
(``--batch`` events of ``--size`` bytes per call, each chunk packed by a new log), in alternating
chunks of ``--calls`` calls, ``--chunks`` chunks per checkout. After each chunk it reads
``INFO commandstats``: the EVAL's microseconds per call, as Redis measures them (the command
alone: not its socket I/O or fsync).
Reports, per checkout, the minimum, lower quartile and median over its chunks, per call and per
event: figures that a shared machine's price swings move less than a wall-clock run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # hub, server: the modules all roots share
from redis_log_bench import HOST, start_redis

STREAM = "script-cost"


def load(root: Path, n: int) -> ModuleType:
    """``plugins/backlog_redis.py`` of the checkout ``root``, as its own module (what it imports
    comes from the first checkout that needed it: only the script and its packing differ)."""
    sys.path.insert(0, str(root))
    try:
        path = root / "plugins" / "backlog_redis.py"
        spec = importlib.util.spec_from_file_location(f"backlog_redis_{n}", path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"no plugins/backlog_redis.py under {root}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(root))


def packed_calls(module: ModuleType, port: int, calls: int, batch: int, size: int) -> bytes:
    """``calls`` script calls of ``batch`` events each, as the checkout's log packs them."""
    from hub.event import make_event

    async def pack() -> bytes:
        log: Any = module.RedisLog(f"redis://{HOST}:{port}/0", STREAM, 1000)
        loop = asyncio.get_running_loop()
        out: list[bytes] = []
        for i in range(calls):
            for j in range(batch):
                ev = make_event("/bench/script", {"i": i, "j": j, "pad": "x" * size})
                name, data = module.PREFIX_FIELD, ev.json[:-38]
                log._queue.append((name, data, b"", loop.create_future(), loop.time() + 60, ev))
            out += log._packed(log._next_batch(loop.time()))
        return b"".join(out)

    return asyncio.run(pack())


def send(port: int, payload: bytes, calls: int) -> None:
    """Write the calls and read their ``calls`` answers (one RESP array each)."""
    import hiredis

    parser = hiredis.Reader()
    with socket.create_connection((HOST, port)) as s:
        s.sendall(payload)
        got = 0
        while got < calls:
            data = s.recv(1 << 20)
            if not data:
                raise SystemExit("redis-server closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise SystemExit(f"Redis refused the script: {reply}")
                got += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", action="append", type=Path, required=True, help="a checkout (repeat)")
    ap.add_argument("--calls", type=int, default=800, help="script calls per chunk")
    ap.add_argument("--chunks", type=int, default=16, help="chunks per checkout")
    ap.add_argument("--batch", type=int, default=5, help="events per call")
    ap.add_argument("--size", type=int, default=250, help="payload bytes per event")
    ap.add_argument("--redis-cpu", type=int, default=0, help="pin redis-server to this core")
    ap.add_argument("--json", action="store_true", help="one JSON object per checkout")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="script-cost-") as tmp:
        proc, port = start_redis(Path(tmp), "always", a.redis_cpu)
        try:
            roots = [r.resolve() for r in a.root]
            modules = [load(r, n) for n, r in enumerate(roots)]
            per_call: list[list[float]] = [[] for _ in roots]
            with redis.Redis(host=HOST, port=port) as r:
                for _chunk in range(a.chunks):
                    for n, module in enumerate(modules):
                        # packed anew (a new log: new batch ids): a batch sent again is answered
                        # from what Redis kept of it, and would measure that instead
                        payload = packed_calls(module, port, a.calls, a.batch, a.size)
                        r.config_resetstat()
                        send(port, payload, a.calls)
                        per_call[n].append(float(r.info("commandstats")["cmdstat_eval"]["usec_per_call"]))
        finally:
            proc.terminate()
            proc.wait(10)
    for root, v in zip(roots, per_call, strict=True):
        q = sorted(v)
        figures = {"root": str(root), "min": q[0], "p25": q[len(q) // 4], "median": statistics.median(q),
                   "batch": a.batch}
        if a.json:
            print(json.dumps(figures))
        else:
            print(f"{root}: EVAL µs per call min {q[0]:.2f} p25 {figures['p25']:.2f} median "
                  f"{figures['median']:.2f} (per event {figures['median'] / a.batch:.2f})")


if __name__ == "__main__":
    main()
