"""`edgelora serve` beyond the OpenAI routes: a fallback role for unknown model names, max_tokens
clamped at the context's end, the role that answered 'auto', the request log, llama-server's
native endpoints, and evicting the active role. Real server processes, the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from .serving import Server, free_port

CTX = 256  # llama.cpp rounds a context up to a multiple of 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Fallback role from the config file (the flag is checked below); the request log on."""
    s = Server(tmp_path_factory.mktemp("extras-home"), "--ctx", str(CTX), config='fallback_role = "terse"\n')
    yield s
    s.stop()


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("quiet-home"), "--ctx", str(CTX), "--quiet")
    yield s
    s.stop()


def ask(srv: Server, model: str, content: str = "What is the moon?", **kw):
    return srv.client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=kw.pop("max_tokens", 6), **kw)


# ---------------------------------------------------------------------------- fallback role


def test_an_unknown_model_name_is_answered_by_the_fallback_role_which_the_response_names(server):
    r = ask(server, "gpt-4o-mini")
    info = r.model_extra["edgelora"]
    assert r.choices[0].message.content
    assert info["fallback"]["requested"] == "gpt-4o-mini" and info["fallback"]["role"] == "terse"
    assert "fallback" in info["fallback"]["note"] and [a["name"] for a in info["adapters"]] == ["terse"]
    assert r.model == "terse"

    chunks = list(ask(server, "gpt-4o-mini", stream=True))
    assert {c.model for c in chunks} == {"terse"} and chunks[-1].model_extra["edgelora"]["fallback"]["role"] == "terse"


def test_a_stack_with_an_unknown_role_is_still_404_with_a_fallback_role_set(server):
    with pytest.raises(openai.NotFoundError, match="unknown role"):
        ask(server, "pirat:0.5+terse:0.5")


def test_without_a_fallback_role_an_unknown_model_is_404_naming_the_flag(quiet):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(quiet, "gpt-4o-mini")
    assert "--fallback-role" in str(caught.value)


def test_a_fallback_role_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "EDGELORA_HOME": str(tmp_path), "EDGELORA_CONFIG": str(tmp_path / "none.toml")}
    p = subprocess.run([sys.executable, "-m", "edgelora", "serve", "--port", str(free_port()), "--fallback-role", "nosuch"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("edgelora: error")]
    assert len(lines) == 1 and "--fallback-role" in lines[0] and "nosuch" in lines[0] and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- max_tokens, auto


def test_max_tokens_above_the_context_is_clamped_and_ends_with_finish_reason_length(server):
    counting = ", ".join(str(i) for i in range(1, 63)) + ","  # ~238 tokens: a few left to generate
    r = server.client.completions.create(model="base", prompt=counting, max_tokens=100_000, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CTX  # stopped where the context ends


def test_auto_answers_with_the_routed_role_as_the_response_model(server):
    r = ask(server, "auto", "Answer as a pirate: hi")
    assert r.model == "pirate" and r.model_extra["edgelora"]["route"]["role"] == "pirate"
    assert r.model_extra["edgelora"]["route"]["reason"]
    chunks = list(ask(server, "auto", "Answer as a pirate: hi", stream=True))
    assert {c.model for c in chunks} == {"pirate"}


# ---------------------------------------------------------------------------- request log


def test_each_request_is_one_log_line_with_role_tokens_and_ms_unless_quiet(server, quiet):
    r = ask(server, "pirate", max_tokens=5)
    time.sleep(0.3)
    lines = [line for line in server.stderr().splitlines() if "POST /v1/chat/completions 200 role=pirate" in line]
    assert lines, server.stderr()[-1500:]
    assert f"tokens={r.usage.prompt_tokens}+{r.usage.completion_tokens}" in lines[-1] and lines[-1].endswith(" ms")
    assert not any("GET /health" in line for line in server.stderr().splitlines())  # polls are not logged

    ask(quiet, "pirate", max_tokens=5)
    time.sleep(0.3)
    assert "/v1/chat/completions" not in quiet.stderr()


# ---------------------------------------------------------------------------- llama-server's endpoints


def test_v1_models_id_answers_a_role_and_404s_an_unknown_one(server):
    assert server.client.models.retrieve("pirate").id == "pirate"
    assert server.get("/v1/models/auto").json()["description"]
    r = server.get("/v1/models/nosuch")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_props_and_slots_describe_the_context_and_the_one_slot(server):
    props = server.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == CTX and props["total_slots"] == 1
    assert props["model_path"].endswith(".gguf") and "im_start" in props["chat_template"]
    assert props["edgelora"]["fallback_role"] == "terse" and "pirate" in props["edgelora"]["roles"]
    slots = server.get("/slots").json()
    assert len(slots) == 1 and slots[0]["n_ctx"] == CTX and slots[0]["is_processing"] is False


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")
                      or line.startswith(name + "{")))


def test_metrics_is_prometheus_text_counting_tokens_and_answers_per_role(server):
    before = server.get("/metrics").text
    r = ask(server, "signoff", max_tokens=4)
    after = server.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert "# TYPE llamacpp:tokens_predicted_total counter" in after.text
    grown = _metric(after.text, "llamacpp:tokens_predicted_total") - _metric(before, "llamacpp:tokens_predicted_total")
    assert grown == r.usage.completion_tokens
    assert 'edgelora_requests_total{role="signoff"} 1' in after.text


def test_tokenize_and_detokenize_round_trip_and_refuse_ids_outside_the_vocabulary(server, engine):
    text = "Hello, world: <|im_start|>"
    tokens = server.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == engine.tokenize(text, add_bos=False, special=True)
    with_pieces = server.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in with_pieces] == tokens and "".join(t["piece"] for t in with_pieces) == text
    assert server.post("/detokenize", json={"tokens": tokens}).json()["content"] == text
    for bad in ([-1], [10**9], ["a"], "1 2"):
        r = server.post("/detokenize", json={"tokens": bad})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    assert server.get("/health").status_code == 200  # and the model still answers
    assert ask(server, "base", max_tokens=2).choices[0].message.content is not None


def test_native_completion_answers_in_llama_server_shape_streamed_or_not(server):
    r = server.post("/completion", json={"prompt": "Once upon a time", "n_predict": 6, "temperature": 0, "model": "pirate"})
    body = r.json()
    assert r.status_code == 200 and body["stop"] is True and body["content"]
    assert body["tokens_predicted"] <= 6 and body["tokens_evaluated"] > 2 and body["stop_type"] in ("limit", "eos")
    assert body["edgelora"]["role"] == "pirate"

    with httpx.stream("POST", server.url + "/completion", timeout=120,
                      json={"prompt": "Once upon a time", "n_predict": 6, "temperature": 0, "stream": True}) as s:
        data = [line[5:].strip() for line in s.iter_lines() if line.startswith("data:")]
    events = [json.loads(d) for d in data]  # every line is JSON: no [DONE] on this route
    assert [e["stop"] for e in events][-1] is True and not any(e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) and events[-1]["tokens_predicted"] <= 6

    bad = server.post("/completion", json={"prompt": "x", "n_predict": 0})
    assert bad.status_code == 400 and "n_predict" in bad.json()["error"]["message"]


# ---------------------------------------------------------------------------- evict


def test_evicting_the_active_role_says_it_stays_resident_and_why(server):
    ask(server, "json", max_tokens=2)  # json is now the active role
    r = server.post("/v1/roles/json/evict").json()
    assert r["kept"] == ["json"] and r["freed"] == [] and "active" in r["note"]
    assert next(row for row in r["roles"] if row["name"] == "json")["resident"] is True

    ask(server, "base", max_tokens=2)  # nothing active any more: now it goes
    r = server.post("/v1/roles/json/evict").json()
    assert r["freed"] == ["json"] and r["kept"] == [] and "note" not in r
    assert next(row for row in r["roles"] if row["name"] == "json")["resident"] is False
