"""End to end in a real browser: `dialog index` over Markdown files, the FastAPI server, and
the chat page driven by headless Chromium (Debian's ``chromium``; ``scripts/install-chromium.sh``).

The page sends the question in ``?q=`` through the same submit handler as the Send button and
reads the reply from the server-sent events of ``/api/chat/stream``; ``--virtual-time-budget``
lets the stream finish before ``--dump-dom`` prints the DOM. Checked: the streamed reply (it
came as several token events), the citations, an abstention, and document text shown as text.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import pytest

from lmsmith.cli import main as lmsmith_main
from lmsmith.dialog.config import ServeConfig
from lmsmith.dialog.generate import load_generator
from lmsmith.dialog.pipeline import Pipeline
from lmsmith.dialog.retrieve import load_index
from lmsmith.dialog.serve import make_server
from lmsmith.models import tiny_causal_lm, tiny_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (run scripts/install-chromium.sh, as `make test` does)",
)


class _Page(HTMLParser):
    """Collects the agent replies (text, token events, abstained), the citations' passage ids
    and text, the grounding lines, and whether any element was injected from document text."""

    def __init__(self):
        super().__init__()
        self.body_state, self.replies, self.citations, self.grounding = None, [], [], []
        self.tokens, self.abstained, self.passages, self.injected = [], [], [], False
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "body":
            self.body_state = a.get("data-state")
        if tag in ("img", "script") and "onerror" in a or a.get("id") == "pwned":
            self.injected = True
        if "citation" in cls:
            self.citations.append(a.get("data-passage-id"))
        mark = ""
        if "reply" in cls:
            mark = "reply"
            self.replies.append("")
            self.tokens.append(int(a.get("data-tokens") or 0))
            self.abstained.append("abstained" in cls)
        elif "grounding" in cls:
            mark = "grounding"
            self.grounding.append("")
        elif "passage" in cls:
            mark = "passage"
            self.passages.append("")
        self._stack.append(mark if mark else (self._stack[-1] if self._stack else ""))
        if tag == "span" and "text" in cls and self._stack[-2:-1] == ["reply"]:
            self._stack[-1] = "reply-text"

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        top = self._stack[-1] if self._stack else ""
        if top == "reply-text":
            self.replies[-1] += data
        elif top == "grounding":
            self.grounding[-1] += data
        elif top == "passage":
            self.passages[-1] += data


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ended by NUL, commands on fd 3, replies on fd 4): no client library, no
    port. ``page(url)`` opens a tab; ``ask`` types a question and presses Send; ``wait_for``
    polls a JavaScript expression in real time (a streamed reply takes as long as it takes)."""

    def __init__(self, profile):
        import os

        self._to_chrome, chrome_in = os.pipe()
        chrome_out, self._from_chrome = os.pipe()
        # chromium reads commands from fd 3 and writes replies to fd 4
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=lambda: (os.dup2(self._to_chrome, 3), os.dup2(self._from_chrome, 4)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._w, self._r = os.fdopen(chrome_in, "wb", buffering=0), os.fdopen(chrome_out, "rb")
        self._id, self._buf, self.session = 0, b"", None

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        import json
        import select
        import time

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(method)
            chunk = self._r.raw.read(65536)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buf += chunk

    def page(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]

    def eval(self, expression: str):
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        state = self.eval("document.location.href + ' ' + document.body.outerHTML.slice(0, 3000)")
        raise TimeoutError(f"{expression}; page: {state}")

    def ask(self, question: str) -> None:
        import json

        self.wait_for(
            "location.protocol === 'http:' && document.readyState === 'complete'"
            " && !!document.getElementById('send')"
        )
        self.eval(
            f"document.getElementById('message').value = {json.dumps(question)};"
            "document.getElementById('send').click(); true"
        )

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def chromium(tmp_path):
    browser = Chromium(tmp_path / "profile")
    yield browser
    browser.close()


EVIL = "<img src=x onerror=\"document.body.id='pwned'\">"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`dialog index` over two Markdown pages (one with HTML in its text), a tiny LM, the
    dense grounder with a bag-of-words encoder (abstains on unrelated questions)."""
    from lmsmith.dialog.ground import DenseGrounder

    tmp = tmp_path_factory.mktemp("browser")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "moving.md").write_text(
        "# Moving house\n\n## Address change\n\nReport a change of address within ten days.\n"
    )
    (docs / "permits.md").write_text(
        f"# Permits\n\n## Fees\n\nA parking permit costs twenty dollars a year.\n\nNote: {EVIL}\n"
    )
    ix = ["--docs", str(docs), "--out", str(tmp / "ix"), "--retriever", "bm25"]
    assert lmsmith_main(["dialog", "index", *ix]) == 0
    gen = tmp / "gen"
    tiny_causal_lm(vocab_size=100).save_pretrained(gen)
    tiny_tokenizer().save_pretrained(gen)
    model, tok, _ = load_generator(str(gen))
    r = load_index(tmp / "ix")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import BowEncoder

    pipe = Pipeline(
        r,
        model,
        tok,
        grounder="dense",
        dense=DenseGrounder(BowEncoder(), r.passages),
        k=2,
        max_new_tokens=8,
        reply_mode="generate",
        abstain_threshold=0.2,
    )
    srv = make_server(Trickle(pipe), ServeConfig(port=0)).start()
    yield pipe, srv.server_address[1], tmp
    srv.shutdown()
    srv.server_close()


class Trickle:
    """The pipeline's events, with every reply piece cut into 3-character tokens sent 20 ms
    apart: a reply the page must assemble from a real stream."""

    def __init__(self, pipe):
        self.pipe, self.retriever = pipe, pipe.retriever

    def stream(self, *args, **kw):
        import time

        for kind, payload in self.pipe.stream(*args, **kw):
            if kind != "token":
                yield kind, payload
                continue
            for i in range(0, len(payload), 3):
                time.sleep(0.02)
                yield kind, payload[i : i + 3]


DONE = "['answered', 'abstained', 'error'].includes(document.body.dataset.state)"


def test_chat_page_streams_a_reply_with_citations(served, chromium):
    pipe, port, tmp = served
    question = "How much does a parking permit cost?"
    expected = pipe.answer(question)
    chromium.page(f"http://127.0.0.1:{port}/")
    chromium.ask(question)  # typed in the box, sent with the Send button
    chromium.wait_for(DONE)
    page = _Page()
    page.feed(chromium.eval("document.documentElement.outerHTML"))
    assert page.body_state == "answered"
    assert page.replies == [expected["reply"]] and page.abstained == [False]
    assert len(expected["reply"]) > 3 and page.tokens[0] == -(-len(expected["reply"]) // 3)
    assert page.citations == [c["passage_id"] for c in expected["citations"]]
    assert page.citations[0].startswith("permits.md")
    assert page.grounding and "twenty dollars" in page.grounding[0]
    html = chromium.eval("document.getElementById('log').innerHTML")
    assert question in html  # the user's turn is shown too
    # the document's HTML is shown as text, never parsed into elements
    assert not page.injected and any("<img" in p for p in page.passages)
    assert "&lt;img" in html and chromium.eval("document.body.id") != "pwned"
    # a link may carry the first question: /?q=... goes through the same submit handler
    chromium.page(f"http://127.0.0.1:{port}/?q={urllib.parse.quote(question)}")
    chromium.wait_for(DONE)
    assert chromium.eval("document.querySelector('.reply .text').textContent") == expected["reply"]


def test_chat_page_shows_an_abstention(served, chromium):
    pipe, port, tmp = served
    question = "Can I keep chickens in my garden?"
    assert pipe.answer(question)["abstained"] is True
    chromium.page(f"http://127.0.0.1:{port}/")
    chromium.ask(question)
    chromium.wait_for(DONE)
    page = _Page()
    page.feed(chromium.eval("document.documentElement.outerHTML"))
    assert page.body_state == "abstained"
    assert page.abstained == [True] and page.citations == []
    assert "documents do not" in page.replies[0].lower()
    assert "do not cover this question" in chromium.eval("document.body.innerText")
