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
