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

Transport rules (a hostile client must cost one thread for at most ``timeout`` seconds, and
never desynchronise a connection): a connection silent, or a body unfinished, for ``timeout``
seconds is closed (408 for a body); Content-Length must be ASCII digits; Transfer-Encoding is
refused; a POST always closes its connection, so bytes beyond Content-Length are never read as
a request; the Host header must be localhost, 127.0.0.1, [::1] or one of ``allowed_hosts``
(DNS rebinding), else 400.
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
_LENGTH = re.compile(r"^[0-9]{1,12}$")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
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


def host_name(header: str) -> str:
    """The host of a Host header, lower-cased, without port or IPv6 brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def make_handler(
    service: ChatService,
    max_body_bytes: int,
    allowed_hosts: tuple[str, ...] = (),
    timeout: float = 30.0,
):
    allowed = {h.lower().strip("[]") for h in (*LOCAL_HOSTS, *allowed_hosts)}

    class Handler(BaseHTTPRequestHandler):
        server_version = "lmsmith-dialog"
        protocol_version = "HTTP/1.1"

        def setup(self):
            self.timeout = timeout  # socket timeout of every read: silent clients are dropped
            super().setup()

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            host = self.headers.get("Host")
            if "*" not in allowed and (host is None or host_name(host) not in allowed):
                self.close_connection = True
                self._error(
                    HTTPStatus.BAD_REQUEST,
                    f"Host {(host or '')[:100]!r} is not allowed (serve --allowed-hosts NAME)",
                )
                return False
            if self.headers.get("Transfer-Encoding") is not None:
                self.close_connection = True
                self._error(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported")
                return False
            length = self.headers.get("Content-Length")
            if length is not None and not _LENGTH.match(length.strip()):
                self.close_connection = True
                self._error(HTTPStatus.BAD_REQUEST, "Content-Length must be ASCII digits")
                return False
            if self.command != "POST" and length is not None and int(length) > 0:
                self.close_connection = True  # an unread body must never be parsed as a request
            return True

        def log_message(self, fmt, *args):  # route access logs through logging
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            if self.close_connection:
                self.send_header("Connection", "close")
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
            # one request per connection: bytes beyond Content-Length are never read as a request
            self.close_connection = True
            length = self.headers.get("Content-Length")
            if length is None:
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            n = int(length)  # ASCII digits (parse_request)
            if n > max_body_bytes:
                return self._error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {max_body_bytes} bytes"
                )
            ctype = self.headers.get("Content-Type", "")
            try:
                body = self.rfile.read(n)
            except TimeoutError:
                return self._error(HTTPStatus.REQUEST_TIMEOUT, f"body unfinished after {timeout}s")
            if len(body) < n:  # the client closed early
                return
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
    """A bound (not yet serving) threaded server; ``cfg`` is a :class:`ServeConfig`.

    Raises:
        UserError: the address cannot be bound (a port in use, an unknown host).
    """
    from lmsmith.errors import UserError

    service = ChatService(pipeline, cfg.max_message_chars, cfg.max_conversations)
    handler = make_handler(
        service, cfg.max_body_bytes, tuple(cfg.allowed_hosts), float(cfg.timeout)
    )
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    except OSError as e:
        raise UserError(
            f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e} (choose another --port)"
        ) from None
    server.daemon_threads = True
    server.service = service
    return server
