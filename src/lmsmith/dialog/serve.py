"""``lmsmith dialog serve``: FastAPI + uvicorn in front of a :class:`~lmsmith.dialog.pipeline.Pipeline`.

Routes (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``POST /api/chat`` ``{"conversation_id"?: str, "message": str}`` →
  ``{"conversation_id", "reply", "grounding", "citations": [...], "abstained": bool}``;
  an unknown id starts a conversation under that id, no id a new one.
- ``POST /api/chat/stream``: the same request; server-sent events ``meta`` (everything but
  the reply), ``token`` (``{"text"}`` pieces of the reply), ``replace`` (``{"text"}``: the
  reply replaced, when a rewrite failed its check), ``done`` (the full response), or ``error``.
- ``POST /v1/chat/completions``: OpenAI-compatible (``messages``, ``stream``, ``max_tokens``;
  stateless: the earlier messages are the dialogue), streaming or not; ``GET /v1/models``.
  Responses carry ``citations``, ``grounding`` and ``abstained`` as extra fields.
- ``GET /healthz``, ``GET /`` (the chat page, ``static/index.html``).

Protection: only ``allowed_hosts`` in the Host header (localhost by default; Starlette's
``TrustedHostMiddleware``); bodies over ``max_body_bytes`` → 413 (declared or streamed);
messages over ``max_message_chars`` → 413; malformed requests → 422 (pydantic); at most
``max_queue`` turns admitted (waiting or running) → else 429 with ``Retry-After``; a turn that
waited more than ``queue_timeout_s`` → 503; uvicorn's ``limit_concurrency`` → 503 for floods of
connections and ``timeout_keep_alive`` for idle ones. The model runs one turn at a time on one
worker thread; health checks and refusals are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lmsmith.errors import UserError

log = logging.getLogger(__name__)

MAX_TURNS_KEPT = 20  # per conversation: (role, text) pairs
MODEL_ID = "lmsmith-dialog"
LOCAL_HOSTS = ["localhost", "127.0.0.1", "[::1]"]


def page() -> bytes:
    return resources.files("lmsmith.dialog").joinpath("static", "index.html").read_bytes()


# --------------------------------------------------------------------------- schemas


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="omit to start a conversation"
    )
    message: str = Field(min_length=1, description="the user's message")

    @field_validator("message")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("message must not be blank")
        return v.strip()


class Citation(BaseModel):
    passage_id: str
    title: str
    text: str
    score: float


class GroundingOut(BaseModel):
    passage_id: str
    text: str
    score: float


class ChatResponse(BaseModel):
    conversation_id: str
    reply: str
    grounding: GroundingOut | None
    citations: list[Citation]
    abstained: bool = Field(description="true when the documents do not answer the message")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class OAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request that matter here; others (temperature, ...) are
    accepted and ignored: replies are greedy."""

    model_config = ConfigDict(extra="allow")
    model: str = MODEL_ID
    messages: list[OAIMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice only")


class OAIChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class OAIChoice(BaseModel):
    index: int = 0
    message: OAIChoiceMessage
    finish_reason: Literal["stop", "length"] = "stop"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[OAIChoice]
    usage: dict[str, int]
    citations: list[Citation]
    grounding: GroundingOut | None
    abstained: bool


# --------------------------------------------------------------------------- the model queue


class QueueFull(Exception):
    """More turns are waiting than the queue admits."""


class ModelQueue:
    """A bounded queue in front of the model: one worker thread runs jobs in arrival order;
    at most ``size`` jobs are admitted (waiting or running), more raise :class:`QueueFull`."""

    def __init__(self, size: int):
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmsmith-model")

    def submit(self, job) -> None:
        if not self._slots.acquire(blocking=False):
            raise QueueFull

        def run():
            try:
                job()
            finally:
                self._slots.release()

        self._pool.submit(run)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ChatService:
    """Conversations (bounded, oldest dropped) around a :class:`Pipeline`, and the queue."""

    def __init__(
        self,
        pipeline,
        max_message_chars: int = 2000,
        max_conversations: int = 1000,
        max_queue: int = 8,
        queue_timeout_s: float = 60.0,
    ):
        self.pipeline = pipeline
        self.max_message_chars, self.max_conversations = max_message_chars, max_conversations
        self.queue_timeout_s = queue_timeout_s
        self.queue = ModelQueue(max_queue)
        self._conversations: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
        self._state = threading.Lock()  # guards the conversation table

    def check_length(self, message: str) -> None:
        if len(message) > self.max_message_chars:
            raise HTTPException(413, f"message is longer than {self.max_message_chars} characters")

    def history(self, cid: str | None) -> tuple[str, list[tuple[str, str]]]:
        """(conversation id, its turns most recent first); starts one when needed."""
        with self._state:
            if cid is None or cid not in self._conversations:
                cid = cid or uuid.uuid4().hex
                self._conversations[cid] = []
                while len(self._conversations) > self.max_conversations:
                    self._conversations.popitem(last=False)
            self._conversations.move_to_end(cid)
            return cid, list(reversed(self._conversations[cid]))

    def remember(self, cid: str, message: str, reply: str) -> None:
        with self._state:
            turns = self._conversations.setdefault(cid, [])
            turns += [("user", message), ("agent", reply)]
            del turns[:-MAX_TURNS_KEPT]

    async def turn(
        self, message: str, history: list[tuple[str, str]], max_new_tokens: int | None = None
    ) -> AsyncIterator[tuple[str, Any]]:
        """The pipeline's events for one turn, produced on the model thread.

        Raises :class:`HTTPException` 429 when the queue is full; yields ``("error", (status,
        message))`` when the turn waited too long (503) or failed (500). Leaving the iterator
        early (a client that went away) cancels the generation at its next token.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        queued = time.monotonic()

        def emit(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def job() -> None:
            try:
                if cancel.is_set():
                    return
                if time.monotonic() - queued > self.queue_timeout_s:
                    emit(("error", (503, "the server is busy; try again later")))
                    return
                for ev in self.pipeline.stream(message, history, cancel, max_new_tokens):
                    if cancel.is_set():
                        return
                    emit(ev)
            except Exception:  # a bug or a model failure: logged, answered 500 without details
                log.exception("chat turn failed")
                emit(("error", (500, "internal error")))
            finally:
                emit(None)

        try:
            self.queue.submit(job)
        except QueueFull:
            raise HTTPException(
                429, "too many requests are waiting; try again later", {"Retry-After": "5"}
            ) from None
        try:
            while (item := await events.get()) is not None:
                yield item
        finally:
            cancel.set()


# --------------------------------------------------------------------------- middleware


class BodyLimit:
    """413 for request bodies over ``max_bytes``, whether declared (Content-Length) or
    streamed (chunked), and 408 for a body that has not fully arrived ``timeout`` seconds
    after the previous piece; a pure ASGI middleware, so nothing is buffered. Every response
    to a request with a body closes its connection: bytes a client sends beyond the declared
    Content-Length are never read as a further request. Before a 413 the rest of the body is
    read and dropped, up to ``drain_bytes``: a server that closes with unread bytes in its
    socket resets the connection, and the client can lose the 413 it was sent."""

    def __init__(self, app, max_bytes: int, timeout: float = 10.0, drain_bytes: int = 1 << 20):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.drain_bytes = drain_bytes

    async def _drain(self, receive, more: bool = True) -> None:
        """Read and drop what is left of a refused body: at most ``drain_bytes``, all within
        ``timeout`` (a client trickling its body cannot hold the connection longer)."""
        dropped, end = 0, asyncio.get_running_loop().time() + self.timeout
        while more and dropped <= self.drain_bytes:
            left = end - asyncio.get_running_loop().time()
            try:
                msg = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            dropped += len(msg.get("body", b""))
            more = msg.get("more_body", False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit() and int(declared) <= self.drain_bytes:
                await self._drain(receive)
            return await self._refuse(send)
        seen = 0
        started = refused = body_done = False

        async def limited_receive():
            # over the limit or too slow: answer here (the app may catch a raised error and
            # answer 400), then tell the app the client left, and drop whatever it sends
            nonlocal seen, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # afterwards receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                refused = True
                if not started:
                    await self._refuse(
                        send, 408, f"request body not received within {self.timeout:g} s"
                    )
                return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await self._drain(receive, msg.get("more_body", False))
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return msg

        async def tracked_send(msg):
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
                if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
            await send(msg)

        await self.app(scope, limited_receive, tracked_send)

    async def _refuse(self, send, status: int = 413, detail: str = ""):
        detail = detail or f"request body over {self.max_bytes} bytes"
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the app


def _sse(event: str, data) -> dict:
    return {"event": event, "data": json.dumps(jsonable_encoder(data))}


def _oai_turns(messages: list[OAIMessage]) -> tuple[str, list[tuple[str, str]]]:
    """(current user message, history most recent first) of an OpenAI ``messages`` list."""
    if messages[-1].role != "user" or not messages[-1].text().strip():
        raise HTTPException(422, "the last message must be a non-empty user message")
    turns = [
        ("user" if m.role == "user" else "agent", m.text().strip())
        for m in messages[:-1]
        if m.role in ("user", "assistant") and m.text().strip()
    ]
    return messages[-1].text().strip(), list(reversed(turns))


def create_app(service: ChatService, cfg) -> FastAPI:
    """The FastAPI application; ``cfg`` is a :class:`~lmsmith.dialog.config.ServeConfig`."""
    app = FastAPI(
        title="lmsmith dialog",
        summary="Answers from a document collection, with the passages it rests on.",
        version="1",
    )
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/v1/"):  # the shape OpenAI clients parse
            body = {"error": {"message": exc.detail, "type": "invalid_request_error"}}
            return JSONResponse(body, exc.status_code, headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        if request.url.path.startswith("/v1/"):
            msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, 422)
        return JSONResponse({"detail": errors}, 422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page(), headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "passages": len(service.pipeline.retriever.passages)}

    async def first_event(events: AsyncIterator) -> tuple[str, Any]:
        kind, payload = await anext(events)
        if kind == "error":
            status, message = payload
            raise HTTPException(status, message)
        return kind, payload

    @app.post("/api/chat", response_model=ChatResponse)
    async def chat(req: ChatRequest) -> ChatResponse:
        service.check_length(req.message)
        cid, history = service.history(req.conversation_id)
        events = service.turn(req.message, history)
        await first_event(events)
        async for kind, payload in events:
            if kind == "error":
                raise HTTPException(*payload)
            if kind == "done":
                service.remember(cid, req.message, payload["reply"])
                return ChatResponse(conversation_id=cid, **payload)
        raise HTTPException(500, "internal error")

    @app.post(
        "/api/chat/stream",
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_stream(req: ChatRequest):
        service.check_length(req.message)
        cid, history = service.history(req.conversation_id)
        events = service.turn(req.message, history)
        _, meta = await first_event(events)

        async def sse():
            yield _sse("meta", {"conversation_id": cid, **meta})
            async for kind, payload in events:
                if kind == "error":
                    yield _sse("error", {"status": payload[0], "detail": payload[1]})
                elif kind == "done":
                    service.remember(cid, req.message, payload["reply"])
                    yield _sse("done", {"conversation_id": cid, **payload})
                else:
                    yield _sse(kind, {"text": payload})

        return EventSourceResponse(sse(), ping=15, headers={"Cache-Control": "no-store"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "lmsmith"}],
        }

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(req: ChatCompletionRequest):
        message, history = _oai_turns(req.messages)
        service.check_length(message)
        limit = req.max_completion_tokens or req.max_tokens
        events = service.turn(message, history, limit)
        _, meta = await first_event(events)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        extras = {k: meta[k] for k in ("citations", "grounding", "abstained")}

        if not req.stream:
            async for kind, payload in events:
                if kind == "error":
                    raise HTTPException(*payload)
                if kind == "done":
                    return ChatCompletion(
                        id=cid,
                        created=created,
                        model=req.model,
                        choices=[OAIChoice(message=OAIChoiceMessage(content=payload["reply"]))],
                        usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                        **extras,
                    )
            raise HTTPException(500, "internal error")

        def chunk(delta: dict, finish: str | None = None, **more) -> dict:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **more,
            }
            return {"data": json.dumps(jsonable_encoder(body))}

        async def sse():
            yield chunk({"role": "assistant", "content": ""}, **extras)
            async for kind, payload in events:
                if kind == "token":
                    yield chunk({"content": payload})
                elif kind == "replace":  # a rewrite failed its check: the sentence follows
                    yield chunk({"content": "\n\n" + payload})
                elif kind == "error":
                    yield {"data": json.dumps({"error": {"message": payload[1]}})}
                    return
            yield chunk({}, "stop")
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), ping=15, headers={"Cache-Control": "no-store"})

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout=cfg.timeout_request_s)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.allowed_hosts or LOCAL_HOSTS)
    return app


# --------------------------------------------------------------------------- the server


def guarded_h11(header_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request head: a connection that has not
    sent a whole request line and headers ``header_timeout`` seconds after connecting (or after
    its previous response) is closed. uvicorn's own keep-alive timer restarts on every byte,
    so a client trickling a header a byte at a time (slowloris) would otherwise hold its
    connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _waiting(self) -> bool:
            """No request in progress: none yet, or the last one answered."""
            return self.cycle is None or self.cycle.response_complete

        def _expired(self) -> None:
            if self._waiting() and not self.transport.is_closing():
                log.info("closing a connection that sent no request head in %gs", header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting():  # a request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


class Server:
    """uvicorn serving the app on a socket bound at construction (port 0: any free port), so
    the address is known before serving starts; ``start()`` serves from a thread (tests)."""

    def __init__(self, app: FastAPI, cfg):
        import uvicorn

        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        try:
            self.socket = socket.create_server((cfg.host, cfg.port), family=family, backlog=128)
        except OSError as e:  # a port in use, an unknown host: the user's to fix
            raise UserError(
                f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e} (choose another --port)"
            ) from None
        self.app, self.service = app, app.state.service
        self.pipeline = self.service.pipeline
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                http=guarded_h11(cfg.timeout_request_s),
                timeout_keep_alive=cfg.timeout_keep_alive_s,
                limit_concurrency=cfg.max_connections,
                timeout_graceful_shutdown=2,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or Ctrl-C in the main thread)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self, timeout: float = 10.0) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self.uvicorn.started:
            if time.monotonic() - t0 > timeout or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def server_close(self) -> None:
        self.service.queue.close()
        self.socket.close()


def make_server(pipeline, cfg) -> Server:
    """A bound (not yet serving) server; ``cfg`` is a :class:`ServeConfig`."""
    service = ChatService(
        pipeline, cfg.max_message_chars, cfg.max_conversations, cfg.max_queue, cfg.queue_timeout_s
    )
    return Server(create_app(service, cfg), cfg)
