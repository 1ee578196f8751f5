"""End to end in a real browser: `dialog index` over Markdown files, the server, and the chat
page driven by headless Chromium (Debian's ``chromium``; ``scripts/install-chromium.sh``).

The page sends the question in ``?q=`` through the same submit handler as the Send button;
``--virtual-time-budget`` lets the page's fetch finish before ``--dump-dom`` prints the DOM.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
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
    """Collects the text of the agent replies and the passage ids of the citations."""

    def __init__(self):
        super().__init__()
        self.body_state, self.replies, self.citations, self.grounding = None, [], [], []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "body":
            self.body_state = a.get("data-state")
        if "citation" in cls:
            self.citations.append(a.get("data-passage-id"))
        mark = "reply" if "reply" in cls else "grounding" if "grounding" in cls else ""
        if mark == "reply":
            self.replies.append("")
        elif mark == "grounding":
            self.grounding.append("")
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


def test_chat_page_shows_reply_and_citations(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "moving.md").write_text(
        "# Moving house\n\n## Address change\n\nReport a change of address within ten days.\n"
    )
    (docs / "permits.md").write_text(
        "# Permits\n\n## Fees\n\nA parking permit costs twenty dollars a year.\n"
    )
    assert (
        lmsmith_main(["dialog", "index", "--docs", str(docs), "--out", str(tmp_path / "ix")]) == 0
    )
    gen = tmp_path / "gen"
    tiny_causal_lm(vocab_size=100).save_pretrained(gen)
    tiny_tokenizer().save_pretrained(gen)
    model, tok, _ = load_generator(str(gen))
    pipe = Pipeline(load_index(tmp_path / "ix"), model, tok, k=2, max_new_tokens=8)
    question = "How much does a parking permit cost?"
    expected = pipe.answer(question)

    srv = make_server(pipe, ServeConfig(port=0))
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/?q={urllib.parse.quote(question)}"
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chrome-profile'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        srv.shutdown()
        srv.server_close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = _Page()
    page.feed(proc.stdout)
    assert page.body_state == "answered", proc.stdout[-2000:]
    assert page.replies == [expected["reply"]]
    assert page.citations == [c["passage_id"] for c in expected["citations"]]
    assert page.citations[0].startswith("permits.md")
    assert page.grounding and "twenty dollars" in page.grounding[0]
    assert question in proc.stdout  # the user's turn is shown too
