"""A test-only OpenAI-compatible HTTP server on 127.0.0.1 that injects faults: 429, 5xx, slow answers (timeouts),
401, malformed and contradictory verdicts. Real behaviour is tested against `transformers serve`; this server
exists only to produce the failures a real one rarely does on cue.

    with FakeOpenAI(script) as server:       # script(request_number, body) -> Reply
        ApiConfig(base_url=server.url, model="judge")
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    text: str = "[[A]]"
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    error: str = "injected fault"


Script = Callable[[int, dict[str, Any]], Reply]


class FakeOpenAI:
    def __init__(self, script: Script, models: tuple[str, ...] = ("judge",), port: int = 0) -> None:
        self.script = script
        self.models = models
        self.bodies: list[dict[str, Any]] = []  # every chat/completions request body, in arrival order
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    self._send(
                        200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]}
                    )
                else:
                    self._send(404, {"error": {"message": "no route"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.bodies.append(body)
                    n = len(server.bodies)
                if body.get("model") not in server.models:
                    self._send(404, {"error": {"message": f"model {body.get('model')!r} does not exist"}})
                    return
                reply = server.script(n, body)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": reply.error}}, reply.headers)
                    return
                usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
                if self.path.endswith("/chat/completions"):
                    choice = {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": "stop",
                    }
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": reply.text, "finish_reason": "stop", "logprobs": None}
                    obj = "text_completion"
                payload = {
                    "id": f"r{n}",
                    "object": obj,
                    "created": 0,
                    "model": body["model"],
                    "choices": [choice],
                }
                self._send(200, {**payload, "usage": usage})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def n_requests(self) -> int:
        return len(self.bodies)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def user_text(body: dict[str, Any]) -> str:
    """The user message of a chat request."""
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def shown_first(body: dict[str, Any]) -> str:
    """The response shown as A in a judge request (between the template's markers)."""
    text = user_text(body)
    return text.split("[Response A]\n", 1)[1].split("\n[End of response A]", 1)[0]
