"""Test support for SQS: a real ``moto`` SQS API server as a subprocess on a free loopback port.

Run as a module (``python -m tests.sqs_fixture --port N``) it is the server itself: moto's
``moto_server`` with one fix — werkzeug sends its own ``Server`` header besides moto's, and
aiohttp's strict parser (on under asyncio debug) refuses a response with two. Imported, it gives
:class:`MotoServer` (start, stop, restart on the same port) and a boto3 client for the test side.
moto missing makes these tests fail, never skip.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.support import HOST, PYTHON, ROOT, free_port, wait_until

REGION = "us-east-1"
KEY = "testing"
SECRET = "testing"
#: moto imports slowly (one to three seconds); give it room on a loaded CI machine
START_TIMEOUT = 30.0


class MotoServer:
    """``moto`` SQS on ``HOST:port``; restartable on the same port (a restart loses the queues)."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> MotoServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tests.sqs_fixture", "--host", HOST, "--port", str(self.port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_until(self._ready, START_TIMEOUT, "moto server to answer")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answers: good enough
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        wait_until(self._port_free, 10, "moto port to be released")

    def _port_free(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((HOST, self.port)) != 0

    def client(self) -> Any:
        """A boto3 SQS client for the test side (sending, inspecting queues)."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client("sqs", region_name=REGION, endpoint_url=self.url,
                            aws_access_key_id=KEY, aws_secret_access_key=SECRET)


def queue_name(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def queue_entry(moto: MotoServer, queue: str, **extra: Any) -> dict[str, Any]:
    """One ``sqs:`` entry pointing at ``moto``, short-polling enough to keep tests quick."""
    entry: dict[str, Any] = {"queue": queue, "region": REGION, "key": KEY, "secret": SECRET,
                             "endpoint_url": moto.url, "wait_seconds": 1, "max_backoff": 1}
    entry.update(extra)
    return entry


def send(client: Any, url: str, body: Any) -> str:
    """Send ``body`` (JSON-encoded unless already a string); returns the MessageId."""
    text = body if isinstance(body, str) else json.dumps(body)
    return str(client.send_message(QueueUrl=url, MessageBody=text)["MessageId"])


def queue_depth(client: Any, url: str) -> int:
    """Messages in the queue, visible or in flight (not yet deleted)."""
    attrs = client.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                      "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def wait_depth(client: Any, url: str, n: int, timeout: float = 10.0) -> None:
    wait_until(lambda: queue_depth(client, url) == n, timeout, f"queue depth {n}")


def _serve(argv: list[str]) -> None:
    """moto_server, without werkzeug's duplicate ``Server`` header."""
    from moto.server import main
    from werkzeug.serving import WSGIRequestHandler

    def send_response(self: WSGIRequestHandler, code: int, message: str | None = None) -> None:
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    WSGIRequestHandler.send_response = send_response  # type: ignore[method-assign, assignment]
    main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
