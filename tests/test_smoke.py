from __future__ import annotations

from tests.support import Daemon, publish, subscribe, wait_subscribers


async def test_publish_reaches_subscriber(daemon: Daemon) -> None:
    async with subscribe(daemon.url, "/fruits/apples") as sub:
        await wait_subscribers(daemon.url, 1)
        status, text = await publish(daemon.url, "/fruits/apples/red", {"x": 1})
        assert status == 202, text
        ev = await sub.next()
        assert ev["x"] == 1
        assert ev["pubsub_topics"] == ["fruits", "apples", "red"]
