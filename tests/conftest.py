"""Fixtures: the real daemon on a free loopback port, stopped (and its exit checked) after."""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Daemon

# PYPUBSUB_TEST_TRACEMALLOC=20: a leaked socket's warning says where it was made (frames kept).
# Unlike PYTHONTRACEMALLOC, it is not inherited by the daemons the tests start (which it slows).
if os.environ.get("PYPUBSUB_TEST_TRACEMALLOC"):
    tracemalloc.start(int(os.environ["PYPUBSUB_TEST_TRACEMALLOC"]))


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons: ``daemon_factory(config=..., acl=..., start=True)``.

    At teardown each is stopped with SIGTERM; it must exit 0 and its log must hold no traceback.
    """
    made: list[Daemon] = []

    def make(config: dict[str, Any] | None = None, acl: dict[str, Any] | None = None,
             start: bool = True, name: str | None = None, **kw: Any) -> Daemon:
        d = Daemon(tmp_path / (name or f"d{len(made)}"), config=config, acl=acl, **kw)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    problems = []
    for d in made:
        if d.proc is None or d.proc.returncode is not None:
            continue
        rc = d.stop()
        if rc != 0:
            problems.append(f"daemon exited {rc}:\n{d.log()[-3000:]}")
    for d in made:
        if "Traceback" in d.log():
            problems.append(f"traceback in daemon log:\n{d.log()[-3000:]}")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon on the test defaults (loopback payloaders, no backlog)."""
    return daemon_factory()


@pytest.fixture(autouse=True)
def _collect_garbage_here() -> Iterator[None]:
    """Collect garbage after each test, so a socket or transport a test leaked warns (and fails)
    in that test, not in whichever later test the garbage collector happens to run."""
    yield
    gc.collect()
