"""docs/library.md stays runnable: every ``python`` block runs, in a fresh interpreter, as written."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support import PYTHON, ROOT

DOC = ROOT / "docs" / "library.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BLOCKS = BLOCK.findall(DOC.read_text())


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_example_runs(code: str) -> None:
    r = subprocess.run([PYTHON, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr


#: aiopubsub 2.1.5's README example, verbatim but for the import (and logwood, an optional
#: logging library of theirs, left out)
AIOPUBSUB_README = """
import asyncio
import hub as aiopubsub

async def main():
    hub = aiopubsub.Hub()
    publisher = aiopubsub.Publisher(hub, prefix = aiopubsub.Key('a'))
    subscriber = aiopubsub.Subscriber(hub, 'subscriber_id')

    sub_key = aiopubsub.Key('a', 'b', '*')
    subscriber.subscribe(sub_key)

    pub_key = aiopubsub.Key('b', 'c')
    publisher.publish(pub_key, 'Hello subscriber')
    await asyncio.sleep(0.001) # Let the callback fire.
    # "('a', 'b', 'c') Hello subscriber" will be printed.

    key, message = await subscriber.consume()
    assert key == aiopubsub.Key('a', 'b', 'c')
    assert message == 'Hello subscriber'

    subscriber.remove_all_listeners()


asyncio.get_event_loop().run_until_complete(main())
"""


def test_aiopubsub_readme_runs_as_written() -> None:
    r = subprocess.run([PYTHON, "-c", AIOPUBSUB_README], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
