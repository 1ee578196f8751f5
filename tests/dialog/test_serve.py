"""The HTTP API over loopback: replies with citations, conversations, limits, 4xx, concurrency."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from lmsmith.dialog.config import ServeConfig
from lmsmith.dialog.corpus import Passage
from lmsmith.dialog.serve import ChatService, make_server


class StubPipeline:
    """Echoes the message and the history it was given; optionally waits on an event."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.retriever = type("R", (), {"passages": [Passage("d::1", "T // body")]})()
        self.delay, self.gate, self.calls = delay, gate, []

    def answer(self, message, history):
        self.calls.append((message, list(history)))
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        return {
            "reply": f"echo: {message} ({len(history)} earlier)",
            "grounding": {"passage_id": "d::1", "text": "body", "score": 1.0},
            "citations": [{"passage_id": "d::1", "title": "T", "text": "T // body", "score": 1.0}],
        }


@pytest.fixture
def serve():
    servers = []

    def start(pipeline, **kw):
        srv = make_server(pipeline, ServeConfig(port=0, **kw))
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
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


def test_healthz_page_and_chat(serve):
    port = serve(StubPipeline())
    assert request(port, "GET", "/healthz") == (200, {"status": "ok", "passages": 1})
    status, page = request(port, "GET", "/")
    assert status == 200 and b"/api/chat" in page and b"citations" in page
    status, out = request(port, "POST", "/api/chat", {"message": " Hello "})
    assert status == 200
    assert set(out) == {"conversation_id", "reply", "grounding", "citations"}
    assert out["reply"] == "echo: Hello (0 earlier)"
    assert out["citations"][0] == {
        "passage_id": "d::1",
        "title": "T",
        "text": "T // body",
        "score": 1.0,
    }


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


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"message": ""}, 400, "message"),
        ({"message": 3}, 400, "message"),
        ({}, 400, "message"),
        ({"message": "hi", "extra": 1}, 400, "unknown"),
        ({"message": "hi", "conversation_id": "../../etc"}, 400, "conversation_id"),
        ({"message": "hi", "conversation_id": 7}, 400, "conversation_id"),
        (["message"], 400, "object"),
        ({"message": "x" * 101}, 413, "longer"),
    ],
)
def test_bad_requests_get_a_clear_4xx(serve, body, status, needle):
    port = serve(StubPipeline(), max_message_chars=100)
    got, out = request(port, "POST", "/api/chat", body)
    assert got == status and needle in out["error"] and out["status"] == status


def test_transport_errors(serve):
    stub = StubPipeline()
    port = serve(stub, max_body_bytes=200)
    assert request(port, "POST", "/api/chat", raw=b"{not json")[0] == 400
    assert request(port, "POST", "/api/chat", raw=b"\xff\xfe")[0] == 400
    status, out = request(port, "POST", "/api/chat", raw=b"x" * 201)
    assert status == 413 and "200 bytes" in out["error"]
    ct = {"Content-Type": "text/plain"}
    assert request(port, "POST", "/api/chat", {"message": "hi"}, headers=ct)[0] == 415
    assert request(port, "GET", "/api/chat")[0] == 405
    assert request(port, "PUT", "/api/chat", {"message": "hi"})[0] == 405
    assert request(port, "POST", "/elsewhere", {"message": "hi"})[0] == 404
    assert not stub.calls  # nothing reached the model


@pytest.mark.parametrize(
    "path", ["/../../../etc/passwd", "/static/index.html", "/serve.py", "/%2e%2e/cli.py", "//etc"]
)
def test_no_path_is_mapped_to_a_file(serve, path):
    port = serve(StubPipeline())
    status, out = request(port, "GET", path)
    assert status == 404 and out["error"].startswith("no such path")


def test_concurrent_requests_and_health_while_busy(serve):
    gate = threading.Event()
    stub = StubPipeline(gate=gate)
    port = serve(stub)
    results = []

    def ask(i):
        results.append(request(port, "POST", "/api/chat", {"message": f"m{i}"}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert request(port, "GET", "/healthz")[0] == 200  # answered while chats wait
    assert time.perf_counter() - t0 < 2
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(out["reply"] for _, out in results) == [
        f"echo: m{i} (0 earlier)" for i in range(6)
    ]
    assert len({out["conversation_id"] for _, out in results}) == 6


def test_conversation_table_is_bounded():
    svc = ChatService(StubPipeline(), max_conversations=3)
    ids = [svc.chat(None, f"q{i}")["conversation_id"] for i in range(5)]
    assert list(svc._conversations) == ids[2:]


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
    port = serve(Pipeline(r, model, tok, k=2, max_new_tokens=4))
    status, out = request(port, "POST", "/api/chat", {"message": "How much does the permit cost?"})
    assert status == 200 and isinstance(out["reply"], str)
    assert [c["passage_id"] for c in out["citations"]] == ["b::1", "a::1"]
    assert out["citations"][0]["title"] == "Fees"
    assert out["grounding"]["text"] == "The permit costs twenty dollars."
