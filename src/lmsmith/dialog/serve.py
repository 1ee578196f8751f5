"""``lmsmith dialog serve``: an HTTP JSON API and a small chat page over an index.

- ``POST /api/chat`` with ``{"conversation_id": optional str, "message": str}`` →
  ``{"conversation_id", "reply", "grounding", "citations": [{"passage_id", "title", "text",
  "score"}]}``. Without an id (or with an unknown one) a conversation starts; its earlier
  turns go into the query and the prompt.
- ``GET /healthz`` → ``{"status": "ok", "passages": N}``.
- ``GET /`` → the chat page (``static/index.html``, shipped in the package).

Standard library only (``ThreadingHTTPServer``: one thread per request). Bodies over
``max_body_bytes`` get 413, malformed JSON or fields 400, other paths 404, other methods 405.
Nothing is read from disk after start-up except the page, by a fixed name: request paths are
never mapped to files. The model runs one request at a time (a lock); health checks and bad
requests are answered meanwhile.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TURNS_KEPT = 20  # per conversation: (role, text) pairs


def page() -> bytes:
    return resources.files("lmsmith.dialog").joinpath("static", "index.html").read_bytes()


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ChatService:
    """Conversations (bounded, oldest dropped) around a :class:`Pipeline`; thread-safe."""

    def __init__(self, pipeline, max_message_chars: int = 2000, max_conversations: int = 1000):
        self.pipeline = pipeline
        self.max_message_chars, self.max_conversations = max_message_chars, max_conversations
        self._conversations: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
        self._state = threading.Lock()  # guards the conversation table
        self._model = threading.Lock()  # one generation at a time

    def parse(self, body: bytes) -> tuple[str | None, str]:
        """(conversation_id, message) from a request body, or :class:`BadRequest`."""
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        unknown = set(data) - {"conversation_id", "message"}
        if unknown:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown fields: {sorted(unknown)}")
        msg = data.get("message")
        if not isinstance(msg, str) or not msg.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "'message' must be a non-empty string")
        if len(msg) > self.max_message_chars:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"'message' is longer than {self.max_message_chars} characters",
            )
        cid = data.get("conversation_id")
        if cid is not None and (not isinstance(cid, str) or not _ID.match(cid)):
            raise BadRequest(
                HTTPStatus.BAD_REQUEST,
                "'conversation_id' must be 1-64 characters of letters, digits, '-' or '_'",
            )
        return cid, msg.strip()

    def chat(self, cid: str | None, message: str) -> dict:
        with self._state:
            if cid is None or cid not in self._conversations:
                cid = cid or uuid.uuid4().hex
                self._conversations[cid] = []
                while len(self._conversations) > self.max_conversations:
                    self._conversations.popitem(last=False)
            self._conversations.move_to_end(cid)
            history = list(reversed(self._conversations[cid]))  # most recent first
        with self._model:
            out = self.pipeline.answer(message, history)
        with self._state:
            turns = self._conversations.setdefault(cid, [])
            turns += [("user", message), ("agent", out["reply"])]
            del turns[:-MAX_TURNS_KEPT]
        return {"conversation_id": cid, **out}


def make_handler(service: ChatService, max_body_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "lmsmith-dialog"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route access logs through logging
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._json(status, {"error": message, "status": int(status)})

        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._json(
                    200, {"status": "ok", "passages": len(service.pipeline.retriever.passages)}
                )
            elif path in ("/", "/index.html"):
                self._send(200, page(), "text/html; charset=utf-8")
            elif path == "/api/chat":
                self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
                self.send_header("Allow", "POST")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {path[:100]}")

        do_HEAD = do_GET

        def do_POST(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path != "/api/chat":
                self.close_connection = True
                return self._error(HTTPStatus.NOT_FOUND, f"no such path: {path[:100]}")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            n = int(length)
            if n > max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as a request
                return self._error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {max_body_bytes} bytes"
                )
            ctype = self.headers.get("Content-Type", "")
            body = self.rfile.read(n)
            if ctype.split(";")[0].strip().lower() != "application/json":
                return self._error(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json"
                )
            try:
                cid, msg = service.parse(body)
            except BadRequest as e:
                return self._error(e.status, e.message)
            try:
                out = service.chat(cid, msg)
            except Exception:  # a bug or a model failure: log it, answer 500 without details
                log.exception("chat failed")
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
            self._json(200, out)

        def _not_allowed(self):
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", "GET, HEAD, POST")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True

        do_PUT = do_DELETE = do_PATCH = _not_allowed

    return Handler


def make_server(pipeline, cfg) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded server; ``cfg`` is a :class:`ServeConfig`."""
    service = ChatService(pipeline, cfg.max_message_chars, cfg.max_conversations)
    server = ThreadingHTTPServer((cfg.host, cfg.port), make_handler(service, cfg.max_body_bytes))
    server.daemon_threads = True
    server.service = service
    return server
