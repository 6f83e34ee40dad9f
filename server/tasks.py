"""Owned background tasks: the one way the daemon stops a task it started.

Every task the daemon creates has an owner that keeps the reference and, on shutdown, cancels
it and awaits its end here (a task that ended with an error has that error logged).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["cancel_and_wait"]

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait for them; errors other than cancellation are logged.

    If the caller itself is being cancelled, that cancellation propagates.
    """
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        try:
            await t
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise
        except Exception:  # the task's own failure: report it, shutdown goes on
            logger.exception("background task %s failed", t.get_name())
