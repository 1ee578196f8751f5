"""The FastAPI app over loopback: replies with citations and abstention, conversations, SSE
streaming, the OpenAI-compatible endpoint through the ``openai`` client, and the limits
(422, 413, 429, 503, Host allow-list)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from lmsmith.dialog.config import ServeConfig
from lmsmith.dialog.corpus import Passage
from lmsmith.dialog.serve import ChatService, make_server

CITE = {"passage_id": "d::1", "title": "T", "text": "T // body", "score": 1.0}


class StubPipeline:
    """Echoes the message and the history it was given, in three streamed pieces; abstains on
    messages that start with "?"; optionally waits on an event before answering."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.retriever = type("R", (), {"passages": [Passage("d::1", "T // body")]})()
        self.gate, self.fail, self.calls = gate, fail, []

    def stream(self, message, history, cancel=None, max_new_tokens=None):
        self.calls.append((message, list(history), max_new_tokens))
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("model exploded")
        if message.startswith("?"):
            meta = {"grounding": None, "citations": [], "abstained": True}
            pieces = ["The documents do not say."]
        else:
            g = {"passage_id": "d::1", "text": "body", "score": 1.0}
            meta = {"grounding": g, "citations": [CITE], "abstained": False}
            pieces = ["echo: ", message, f" ({len(history)} earlier)"]
        yield "meta", meta
        for p in pieces:
            yield "token", p
        yield "done", {"reply": "".join(pieces), **meta}


@pytest.fixture
def serve():
    servers = []

    def start(pipeline, **kw):
        srv = make_server(pipeline, ServeConfig(port=0, **kw)).start()
        servers.append(srv)
        return srv.server_address[1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def request(port, method, path, body=None, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype and payload else payload)


def sse_events(payload: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in payload.decode().replace("\r\n", "\n").split("\n\n"):
        lines = dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln)
        if "data" in lines:
            out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_health_page_openapi_and_chat(serve):
    port = serve(StubPipeline())
    assert request(port, "GET", "/healthz") == (200, {"status": "ok", "passages": 1})
    status, page = request(port, "GET", "/")
    assert status == 200 and b"/api/chat/stream" in page and b"citations" in page
    status, spec = request(port, "GET", "/openapi.json")
    assert status == 200 and {"/api/chat", "/api/chat/stream", "/v1/chat/completions"} <= set(
        spec["paths"]
    )
    assert "abstained" in spec["components"]["schemas"]["ChatResponse"]["properties"]
    assert request(port, "GET", "/docs")[0] == 200
    status, out = request(port, "POST", "/api/chat", {"message": " Hello "})
    assert status == 200
    assert out == {
        "conversation_id": out["conversation_id"],
        "reply": "echo: Hello (0 earlier)",
        "grounding": {"passage_id": "d::1", "text": "body", "score": 1.0},
        "citations": [CITE],
        "abstained": False,
    }
    status, out = request(port, "POST", "/api/chat", {"message": "?refund"})
    assert status == 200 and out["abstained"] is True and out["citations"] == []


def test_conversation_keeps_history(serve):
    stub = StubPipeline()
    port = serve(stub)
    _, first = request(port, "POST", "/api/chat", {"message": "one"})
    cid = first["conversation_id"]
    _, second = request(port, "POST", "/api/chat", {"conversation_id": cid, "message": "two"})
    assert second["conversation_id"] == cid and second["reply"] == "echo: two (2 earlier)"
    assert stub.calls[1][1] == [("agent", "echo: one (0 earlier)"), ("user", "one")]
    _, other = request(port, "POST", "/api/chat", {"conversation_id": "mine-1", "message": "x"})
    assert other["conversation_id"] == "mine-1" and other["reply"].endswith("(0 earlier)")


def test_stream_sends_meta_tokens_done(serve):
    port = serve(StubPipeline())
    status, payload = request(port, "POST", "/api/chat/stream", {"message": "hi"})
    assert status == 200
    events = sse_events(payload)
    kinds = [k for k, _ in events]
    assert kinds == ["meta", "token", "token", "token", "done"]
    meta, done = events[0][1], events[-1][1]
    assert meta["citations"] == [CITE] and meta["abstained"] is False and "reply" not in meta
    assert "".join(d["text"] for k, d in events if k == "token") == done["reply"]
    assert done["conversation_id"] == meta["conversation_id"]
    _, payload = request(port, "POST", "/api/chat/stream", {"message": "?nothing"})
    done = sse_events(payload)[-1][1]
    assert done["abstained"] is True and done["citations"] == []


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": 3}, "message"),
        ({}, "message"),
        ({"message": "hi", "extra": 1}, "extra"),
        ({"message": "hi", "conversation_id": "../../etc"}, "conversation_id"),
        ({"message": "hi", "conversation_id": 7}, "conversation_id"),
        (["message"], "body"),
    ],
)
def test_validation_errors_are_422(serve, body, needle):
    stub = StubPipeline()
    port = serve(stub)
    for path in ("/api/chat", "/api/chat/stream"):
        got, out = request(port, "POST", path, body)
        assert got == 422 and needle in json.dumps(out["detail"])
    assert not stub.calls


def test_size_limits_are_413(serve):
    stub = StubPipeline()
    port = serve(stub, max_body_bytes=200, max_message_chars=100)
    status, out = request(port, "POST", "/api/chat", {"message": "x" * 101})
    assert status == 413 and "100 characters" in out["detail"]
    status, out = request(port, "POST", "/api/chat", raw=b'{"message": "' + b"x" * 300 + b'"}')
    assert status == 413 and "200 bytes" in out["detail"]
    # a chunked body declares no length: counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    chunks = iter([b'{"message": "', b"x" * 150, b"y" * 150, b'"}'])
    conn.request(
        "POST",
        "/api/chat",
        body=chunks,
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    # a Content-Length that is not a number: refused. Sent with no body bytes after the
    # headers: a server that refuses and closes with unread bytes in its socket resets the
    # connection, and the client may then lose the response (a race, not the server's answer)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: abc\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert int(reply.split(b" ", 2)[1]) in (400, 413), reply[:200]
    assert not stub.calls  # nothing reached the model


def test_other_errors(serve):
    stub = StubPipeline()
    port = serve(stub)
    assert request(port, "POST", "/api/chat", raw=b"{not json")[0] == 422
    assert request(port, "GET", "/api/chat")[0] == 405
    assert request(port, "POST", "/elsewhere", {"message": "hi"})[0] == 404
    for path in ("/../../../etc/passwd", "/static/index.html", "/serve.py", "/%2e%2e/cli.py"):
        assert request(port, "GET", path)[0] == 404
    assert not stub.calls


def test_host_header_allow_list(serve):
    port = serve(StubPipeline())
    assert request(port, "GET", "/healthz", headers={"Host": "evil.example"})[0] == 400
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert request(port, "GET", "/healthz", headers={"Host": host})[0] == 200
    port2 = serve(StubPipeline(), allowed_hosts=["docs.example"])
    assert request(port2, "GET", "/healthz", headers={"Host": "docs.example"})[0] == 200
    assert request(port2, "GET", "/healthz", headers={"Host": "localhost"})[0] == 400


def test_binds_loopback_by_default():
    cfg = ServeConfig(port=0)
    assert cfg.host == "127.0.0.1"
    srv = make_server(StubPipeline(), cfg)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_full_queue_answers_429_and_health_stays_up(serve):
    gate = threading.Event()
    stub = StubPipeline(gate=gate)
    port = serve(stub, max_queue=2)
    results = []

    def ask(i):
        results.append(request(port, "POST", "/api/chat", {"message": f"m{i}"}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(stub.calls) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the second request is admitted and waiting
    t0 = time.perf_counter()
    status, out = request(port, "POST", "/api/chat", {"message": "one too many"})
    assert status == 429 and "try again" in out["detail"]
    status, _ = request(
        port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 429
    assert request(port, "GET", "/healthz")[0] == 200
    assert time.perf_counter() - t0 < 2  # refused at once, never a hang
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(out["reply"] for _, out in results) == [
        "echo: m0 (0 earlier)",
        "echo: m1 (0 earlier)",
    ]
    assert request(port, "POST", "/api/chat", {"message": "later"})[0] == 200  # slots freed


def test_a_turn_that_waited_too_long_gets_503(serve):
    gate = threading.Event()
    stub = StubPipeline(gate=gate)
    port = serve(stub, max_queue=4, queue_timeout_s=0.2)
    first = threading.Thread(target=request, args=(port, "POST", "/api/chat", {"message": "a"}))
    first.start()
    deadline = time.monotonic() + 5
    while not stub.calls and time.monotonic() < deadline:  # "a" holds the model
        time.sleep(0.01)
    result = []
    second = threading.Thread(
        target=lambda: result.append(request(port, "POST", "/api/chat", {"message": "b"}))
    )
    second.start()
    time.sleep(0.4)
    gate.set()
    first.join(10)
    second.join(10)
    assert result[0][0] == 503 and "busy" in result[0][1]["detail"]
    assert [c[0] for c in stub.calls] == ["a"]  # the late turn never reached the model


def test_model_failure_is_500_without_details(serve):
    port = serve(StubPipeline(fail=True))
    status, out = request(port, "POST", "/api/chat", {"message": "hi"})
    assert status == 500 and out["detail"] == "internal error"


def test_openai_client_plain_and_streaming(serve):
    from openai import OpenAI

    stub = StubPipeline()
    port = serve(stub)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["lmsmith-dialog"]
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    out = client.chat.completions.create(model="lmsmith-dialog", messages=msgs, max_tokens=7)
    assert out.choices[0].message.content == "echo: second (2 earlier)"
    assert out.choices[0].finish_reason == "stop"
    extra = out.model_extra
    assert extra["abstained"] is False and extra["citations"][0]["passage_id"] == "d::1"
    assert stub.calls[-1] == ("second", [("agent", "ok"), ("user", "first")], 7)

    stream = client.chat.completions.create(
        model="lmsmith-dialog", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "echo: hi (0 earlier)"
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 3  # streamed, not one blob
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].model_extra["abstained"] is False

    out = client.chat.completions.create(
        model="lmsmith-dialog", messages=[{"role": "user", "content": "?refund"}]
    )
    assert out.model_extra["abstained"] is True

    import openai

    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model="lmsmith-dialog", messages=[{"role": "assistant", "content": "hi"}]
        )
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="lmsmith-dialog", messages=[])


def test_conversation_table_is_bounded():
    svc = ChatService(StubPipeline(), max_conversations=3)
    ids = [svc.history(None)[0] for _ in range(5)]
    assert list(svc._conversations) == ids[2:]


def test_idle_connections_are_closed(serve):
    port = serve(StubPipeline(), timeout_keep_alive_s=1)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while not got.endswith(b"}"):  # the whole response: headers, then the JSON body
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    assert s.recv(4096) == b""  # the server hung up
    assert time.monotonic() - t0 < 4
    s.close()


def test_real_pipeline_over_loopback(serve, tmp_path):
    from lmsmith.dialog.generate import load_generator
    from lmsmith.dialog.pipeline import Pipeline
    from lmsmith.dialog.retrieve import BM25Retriever
    from lmsmith.models import tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm(vocab_size=100).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tok, _ = load_generator(str(tmp_path))
    r = BM25Retriever()
    r.index(
        [
            Passage(
                "a::1", "Moving // Report a change of address within ten days.", title="Moving"
            ),
            Passage("b::1", "Fees // The permit costs twenty dollars.", title="Fees"),
        ]
    )
    pipe = Pipeline(r, model, tok, k=2, max_new_tokens=4)
    port = serve(pipe)
    status, out = request(port, "POST", "/api/chat", {"message": "How much does the permit cost?"})
    assert status == 200 and isinstance(out["reply"], str) and out["abstained"] is False
    assert [c["passage_id"] for c in out["citations"]] == ["b::1", "a::1"]
    assert out["citations"][0]["title"] == "Fees"
    assert out["grounding"]["text"] == "The permit costs twenty dollars."
    status, payload = request(port, "POST", "/api/chat/stream", {"message": "permit cost?"})
    events = sse_events(payload)
    assert events[0][0] == "meta" and events[-1][0] == "done"
    streamed = "".join(d["text"] for k, d in events if k == "token")
    assert streamed.strip() == events[-1][1]["reply"] == pipe.answer("permit cost?")["reply"]


def test_slow_clients_are_cut_off(serve):
    port = serve(StubPipeline(), timeout_request_s=0.5)
    # a request head trickled a byte at a time (slowloris) does not hold the connection
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    closed = False
    for b in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40:
        try:
            s.sendall(bytes([b]))
        except OSError:
            closed = True
            break
        time.sleep(0.05)
        if time.monotonic() - t0 > 1.5:
            break
    if not closed:
        s.settimeout(3)
        closed = s.recv(4096) == b""
    assert closed and time.monotonic() - t0 < 4
    s.close()
    # a body that stops arriving gets 408
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 40\r\n\r\n{"message": '
    )
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 408")
    s.close()
    assert request(port, "GET", "/healthz")[0] == 200
