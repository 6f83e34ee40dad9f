"""The live page: what a browser navigating to a subscription path is shown.

Owns building the page (``server/static/page.html`` and ``page.js`` with the browser client
``clients/browser/pypubsub.js`` inlined as a module script: one request, no CDN, no build step;
``server/static/pypubsub.js`` links to the client so an installed package carries it) and its response
headers (a Content-Security-Policy that allows exactly that script and same-origin
connections). The page itself subscribes with Server-Sent Events to the path it was served on.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
from pathlib import Path

from aiohttp import web

__all__ = ["CLIENT_PATH", "PAGE_PATH", "SCRIPT_PATH", "load_page", "page_html", "page_response"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATH = STATIC / "page.html"
SCRIPT_PATH = STATIC / "page.js"
#: the browser client (a link to clients/browser/pypubsub.js in a checkout, a copy when installed)
CLIENT_PATH = STATIC / "pypubsub.js"
#: where page.html wants the script
_MARKER = "<!-- pypubsub:script -->"


@functools.cache
def load_page() -> tuple[bytes, str] | None:
    """The page, or None (logged once) when its files are missing from this installation:
    browser navigations then get the NDJSON stream, as before the page existed."""
    try:
        return page_html()
    except (OSError, ValueError) as e:
        logger.error("the live page is unavailable (%s): browsers get the NDJSON stream", e)
        return None


def page_html() -> tuple[bytes, str]:
    """The page and the CSP hash of its one script (read once: the files ship with the code)."""
    page = PAGE_PATH.read_text(encoding="utf-8")
    client = CLIENT_PATH.read_text(encoding="utf-8")
    app_js = SCRIPT_PATH.read_text(encoding="utf-8")
    script = "\n" + client + "\n" + app_js + "\n"
    if _MARKER not in page:
        raise ValueError(f"{PAGE_PATH} lacks {_MARKER}")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    html = page.replace(_MARKER, f'<script type="module">{script}</script>')
    return html.encode("utf-8"), f"'sha256-{digest}'"


def page_response(server: str) -> web.Response | None:
    """The page's response, or None when it is unavailable (see :func:`load_page`)."""
    page = load_page()
    if page is None:
        return None
    body, script_hash = page
    return web.Response(body=body, headers={
        "Server": server,
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-cache",
        "Vary": "Accept",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": (f"default-src 'none'; script-src {script_hash}; "
                                    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    })
