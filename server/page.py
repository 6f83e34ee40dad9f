"""The live page: what a browser navigating to a subscription path is shown.

Owns building the page (``server/page.html`` with the browser client ``clients/browser/
pypubsub.js`` inlined as a module script: one request, no CDN, no build step) and its response
headers (a Content-Security-Policy that allows exactly that script and same-origin
connections). The page itself subscribes with Server-Sent Events to the path it was served on.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

from aiohttp import web

__all__ = ["CLIENT_PATH", "PAGE_PATH", "page_html", "page_response"]

ROOT = Path(__file__).resolve().parent.parent
PAGE_PATH = ROOT / "server" / "page.html"
CLIENT_PATH = ROOT / "clients" / "browser" / "pypubsub.js"
#: where page.html wants the script
_MARKER = "<!-- pypubsub:script -->"


@functools.cache
def page_html() -> tuple[bytes, str]:
    """The page and the CSP hash of its one script (read once: the files ship with the code)."""
    page = PAGE_PATH.read_text(encoding="utf-8")
    client = CLIENT_PATH.read_text(encoding="utf-8")
    app_js = (ROOT / "server" / "page.js").read_text(encoding="utf-8")
    script = "\n" + client + "\n" + app_js + "\n"
    if _MARKER not in page:
        raise RuntimeError(f"{PAGE_PATH} lacks {_MARKER}")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    html = page.replace(_MARKER, f'<script type="module">{script}</script>')
    return html.encode("utf-8"), f"'sha256-{digest}'"


def page_response(server: str) -> web.Response:
    body, script_hash = page_html()
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
