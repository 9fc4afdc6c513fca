"""A hostile request body is the client's error (400, one message), never a 500: the server's JSON parsing."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dsft.runtime.engine import Engine
from dsft.serve import create_app
from dsft.serve.guard import allowed_hosts


@pytest.fixture(scope="module")
def client():
    """The real app in front of a runtime that is never reached: every body here is refused before it is."""
    from fastapi.testclient import TestClient

    runtime = SimpleNamespace(name="fake-base", adapters={})
    engine = Engine(runtime)
    app = create_app(runtime, engine, hosts=allowed_hosts("127.0.0.1", 8000))
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c
    engine.close()


DEEP = "[" * 100_000 + "]" * 100_000  # 200 kB: under the body cap, far over the JSON parser's stack


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", '{"model": "fake-base", "prompt": ' + DEEP + "}"),
    ("/v1/chat/completions", '{"model": "fake-base", "messages": ' + DEEP + "}"),
    ("/v1/adapters", '{"ref": ' + DEEP + "}"),
], ids=["completions", "chat", "attach"])
def test_json_nested_100k_deep_is_a_400(client, route, body):
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "the request body is JSON nested too deeply to read; flatten it"


def test_the_server_answers_after_them(client):
    r = client.post("/v1/completions", content=json.dumps({"model": "fake-base", "prompt": "x", "top_p": 0}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    assert client.get("/health").json()["status"] == "ok"


COMPLETION = {"model": "fake-base", "prompt": "x", "max_tokens": 2}
CHAT = {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
    ("/v1/completions", {**COMPLETION, "temperature": 1e-45}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),  # never silently the default 256
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/completions", {**COMPLETION, "stop": ["x"] * 17}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": "x" * 1025}, "stop"),
], ids=["seed-2**64", "seed-negative", "temperature-1e-45", "top_p-0", "top_p-1.5", "chat-max_tokens-0",
        "chat-max_completion_tokens-0", "stop-17-sequences", "stop-1025-characters"])
def test_sampling_out_of_range_is_refused_before_the_engine(client, route, body, param):
    """Refused at the schema: such a request never joins a batch, so it cannot fail the others."""
    r = client.post(route, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# "\\ud800" in the JSON text (ASCII bytes): json.loads makes it a lone UTF-16 surrogate


@pytest.mark.parametrize("route, body, param, where", [
    ("/v1/completions", '{"model": "fake-base", "prompt": "\\ud800 hi", "max_tokens": 8}', "prompt", "position 0"),
    ("/v1/completions", '{"model": "fake-base", "prompt": ["ok", "a\\ud800 hi"], "max_tokens": 8}', "prompt",
     "position 1 of [1]"),
    ("/v1/completions", '{"model": "fake-base", "prompt": "x", "stop": ["\\ud800 hi"]}', "stop", "position 0 of [0]"),
    ("/v1/completions", '{"model": "\\ud800 hi", "prompt": "x"}', "model", "position 0"),
    ("/v1/chat/completions", '{"model": "fake-base", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
     "messages.0.content", "position 0"),
    ("/v1/chat/completions", '{"model": "fake-base", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\ud800 hi"}]}]}', "messages.0.content", "position 0 of [0]['text']"),
    ("/v1/chat/completions", '{"model": "fake-base", "messages": [{"role": "user", "content": "x"}], "stop": "\\ud800 hi"}',
     "stop", "position 0"),
    ("/v1/adapters", '{"ref": "\\ud800 hi"}', "ref", "position 0"),
], ids=["prompt", "prompt-list", "stop-list", "model", "chat-content", "chat-content-part", "chat-stop", "attach-ref"])
def test_a_lone_surrogate_is_a_400_naming_the_field(client, route, body, param, where):
    """Not a 500 from the tokenizer or the response encoder: the field and the position, one line."""
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"] == f"{param}: not valid Unicode text (a lone surrogate at {where})"


def test_valid_non_ascii_text_is_not_refused_as_unicode(client):
    """Astral characters (a surrogate pair in JSON) and plain UTF-8 pass the check: the error is top_p's."""
    body = '{"model": "fake-base", "prompt": "\\ud83d\\ude00 caf\u00e9", "top_p": 0}'
    r = client.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p", r.text
