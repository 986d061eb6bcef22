"""The web page of `edgelora serve` at `/`: its files are served from the package with a strict
Content-Security-Policy, and a real headless Chromium drives it against a real server and model.

The browser test needs Chromium (Debian: `apt-get install -y chromium`, or `sh packaging/chromium.sh`
as the README test command does); without it it is skipped."""

from __future__ import annotations

import json

import pytest

from .cdp import Browser, chromium_path
from .serving import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("web-home"), "--ctx", "1024", "--quiet")
    yield s
    s.stop()


def test_the_page_and_its_files_come_from_the_package_and_load_nothing_else(server):
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/web/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    js = server.get("/web/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "text/event-stream" not in js.text
    assert server.get("/web/style.css").headers["content-type"].startswith("text/css")
    for path in ("/web/index.htm", "/web/..%2Fserver.py", "/web/%2e%2e/server.py"):
        assert server.get(path).status_code == 404


needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="chromium is not installed (Debian: apt-get install -y chromium)")


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


ANSWERS = "[...document.querySelectorAll('#column-{col} .message.assistant')]"


def _send(browser: Browser, prompt: str) -> None:
    browser.evaluate(f"document.getElementById('prompt').value = {json.dumps(prompt)};"
                     "document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")


def _answers(browser: Browser, col: int, count: int) -> list[dict]:
    """Wait until column `col` holds `count` finished answers (a finished one carries its meta line)."""
    browser.wait_for(f"{ANSWERS.format(col=col)}.filter(e => e.querySelector('.meta')).length >= {count}", timeout=120)
    return browser.evaluate(f"{ANSWERS.format(col=col)}.map(e => ({{text: e.firstChild ? e.firstChild.nodeValue : '',"
                            f" meta: e.querySelector('.meta') ? e.querySelector('.meta').textContent : ''}}))")


@pytest.mark.slow  # ~30 s on a busy 2-core machine: five streamed answers
@needs_chromium
def test_in_chromium_the_page_lists_roles_streams_answers_stacks_routes_and_compares(server, browser):
    browser.call("Page.navigate", url=server.url + "/")
    roles = browser.wait_for("[...document.querySelectorAll('#role-a option')].map(o => o.value)")
    assert roles[:2] == ["base", "auto"] and {"pirate", "terse"} <= set(roles)
    browser.evaluate("document.getElementById('max-tokens').value = 12")

    # one role, streamed
    browser.evaluate("document.getElementById('role-a').value = 'pirate';"
                     "document.getElementById('role-a').dispatchEvent(new Event('change'))")
    assert "pirate:" in browser.evaluate("document.getElementById('role-description').textContent")
    _send(browser, "What is the moon?")
    answer = _answers(browser, 0, 1)[0]
    assert answer["text"].strip() and "role pirate" in answer["meta"]

    # the answer came as server-sent events, from a same-origin JSON POST
    posts = [e["params"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
             and e["params"]["request"]["url"].endswith("/v1/chat/completions")]
    headers = {k.lower(): v for k, v in posts[0]["request"]["headers"].items()}
    assert headers["content-type"] == "application/json" and json.loads(posts[0]["request"]["postData"])["stream"] is True
    streamed = [e["params"]["response"] for e in browser.events if e.get("method") == "Network.responseReceived"
                and e["params"]["response"]["url"].endswith("/v1/chat/completions")]
    assert streamed[0]["status"] == 200 and streamed[0]["mimeType"] == "text/event-stream"

    # auto shows which role it chose and why
    browser.evaluate("document.getElementById('role-a').value = 'auto';"
                     "document.getElementById('role-a').dispatchEvent(new Event('change'))")
    _send(browser, "Answer as a pirate: hi")
    assert "auto chose pirate: " in _answers(browser, 0, 1)[0]["meta"]

    # a weighted stack of two
    browser.evaluate("""for (const [id, v] of [['mode', 'stack'], ['role-a', 'pirate'], ['role-b', 'terse']]) {
        document.getElementById(id).value = v; document.getElementById(id).dispatchEvent(new Event('change')); }""")
    _send(browser, "Name a planet.")
    assert "role pirate:0.7 + terse:0.3" in _answers(browser, 0, 1)[0]["meta"]

    # two roles side by side
    browser.evaluate("document.getElementById('mode').value = 'compare';"
                     "document.getElementById('mode').dispatchEvent(new Event('change'))")
    _send(browser, "Say hello.")
    left, right = _answers(browser, 0, 1)[0], _answers(browser, 1, 1)[0]
    assert "role pirate" in left["meta"] and "role terse" in right["meta"] and left["text"] and right["text"]

    # every conversation of the session is in the history list, and one click brings it back
    titles = browser.evaluate("[...document.querySelectorAll('#history li')].map(li => li.textContent)")
    assert titles == ["Say hello.", "Name a planet.", "Answer as a pirate: hi", "What is the moon?"]
    browser.evaluate("document.querySelectorAll('#history li')[3].click()")
    assert browser.evaluate("document.querySelector('#column-0 .message.user').textContent") == "What is the moon?"
    assert browser.evaluate("document.getElementById('error').textContent") == ""
    assert browser.console_errors() == []
    browser.evaluate("console.error('probe')")  # the check above can see an error when there is one
    browser.evaluate("1")
    assert any("probe" in e for e in browser.console_errors())


def _bodies(browser: Browser) -> list[dict]:
    """The JSON bodies the page POSTed to /v1/chat/completions, in order."""
    return [json.loads(e["params"]["request"]["postData"]) for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
            and e["params"]["request"]["url"].endswith("/v1/chat/completions")]


def _choose(browser: Browser, **values) -> None:
    for key, value in values.items():
        browser.evaluate(f"document.getElementById({json.dumps(key.replace('_', '-'))}).value = {json.dumps(value)};"
                         f"document.getElementById({json.dumps(key.replace('_', '-'))}).dispatchEvent(new Event('change'))")


@pytest.mark.slow  # ~20 s: three short answers and a stopped one
@needs_chromium
def test_in_chromium_stopped_answers_are_no_context_and_a_failing_column_does_not_silence_the_other(server, browser):
    browser.call("Page.navigate", url=server.url + "/")
    browser.wait_for("document.querySelectorAll('#role-a option').length")
    _choose(browser, mode="single", role_a="base", max_tokens="400")

    # stopped before any word: the empty answer goes
    browser.evaluate("document.getElementById('prompt').value = 'Count from one to one hundred in words.';"
                     "document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}));"
                     "document.getElementById('stop').click()")  # in one go: before any word can come
    browser.wait_for("!document.getElementById('send').disabled")
    assert browser.evaluate(f"{ANSWERS.format(col=0)}.length") == 0

    # stopped part way: kept in view, marked stopped
    # a prompt whose answer runs long, stopped at its first words (a short answer could end on its own first)
    _send(browser, "Write a long story about a dragon and a knight, in many paragraphs.")
    browser.wait_for(f"{ANSWERS.format(col=0)}.some(e => e.firstChild && e.firstChild.nodeValue.length > 0)", timeout=120)
    browser.evaluate("document.getElementById('stop').click()")
    (stopped,) = _answers(browser, 0, 1)
    assert stopped["text"] and "stopped" in stopped["meta"]

    # the next turn sends neither: only the user's turns
    _choose(browser, max_tokens="4")
    _send(browser, "Say hi.")
    _answers(browser, 0, 2)
    sent = _bodies(browser)[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "user", "user"]
    assert stopped["text"] not in [m["content"] for m in sent]

    # side by side, the first role unknown to the server: the second still answers
    browser.evaluate("document.getElementById('role-a').append(new Option('nosuchrole', 'nosuchrole'))")
    _choose(browser, mode="compare", role_a="nosuchrole", role_b="base")
    _send(browser, "Name a colour.")
    (right,) = _answers(browser, 1, 1)
    assert right["text"] and "role base" in right["meta"]
    assert browser.evaluate(f"{ANSWERS.format(col=0)}.length") == 0
    assert "nosuchrole" in browser.evaluate("document.querySelector('#column-0 .message.error').textContent")
    assert "nosuchrole" in browser.evaluate("document.getElementById('error').textContent")
