"""A server without an API key answers only requests that name its own address and come from no other site;
with a key, --api-key on the command line warns that `ps` shows it."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dsft.serve.guard import allowed_hosts

BODY = {"model": "tiny-deepseek-v2", "prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def keyless(serve_home):
    """An in-process app bound (as `dsft serve` would be) to 127.0.0.1:8000 without an API key."""
    from fastapi.testclient import TestClient

    from dsft.runtime import Engine, load_base
    from dsft.serve import create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSFT_HOME", str(serve_home))
        runtime = load_base("tiny-deepseek-v2", device="cpu")
    engine = Engine(runtime)
    app = create_app(runtime, engine, hosts=allowed_hosts("127.0.0.1", 8000))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c
    engine.close()


def test_the_bound_address_and_loopback_names_are_the_allowed_hosts():
    hosts = allowed_hosts("127.0.0.1", 8000)
    assert {"127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"} <= hosts and "evil.com:8000" not in hosts
    assert allowed_hosts("10.0.0.5", 80) == {"10.0.0.5", "10.0.0.5:80"}
    assert allowed_hosts("0.0.0.0", 8000) is None


def test_a_keyless_server_answers_its_own_address(keyless):
    r = keyless.post("/v1/completions", json=BODY, headers={"Origin": "http://localhost:8000"})
    assert r.status_code == 200, r.text
    assert "adapters" not in keyless.get("/health").json()


@pytest.mark.parametrize("headers,status", [
    ({"Host": "evil.example:8000"}, 403),                              # DNS rebinding: the page's own name
    ({"Origin": "http://evil.example"}, 403),                          # a cross-site page posting here
    ({"Content-Type": "text/plain"}, 415),                             # what a cross-site form may send unasked
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
])
def test_requests_through_another_site_are_refused(keyless, headers, status):
    import json

    r = keyless.post("/v1/completions", content=json.dumps(BODY), headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status and r.json()["error"]["message"]
    assert keyless.post("/v1/adapters", content='{"ref": "finance"}', headers=headers).status_code in (403, 415)


def test_api_key_on_the_command_line_warns_and_names_the_environment_variable(monkeypatch):
    from dsft.cli.main import app

    monkeypatch.delenv("DSFT_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--api-key", "s3cret", "--port", "70000"])
    assert result.exit_code == 2 and "DSFT_API_KEY" in result.output and "ps" in result.output
    monkeypatch.setenv("DSFT_API_KEY", "s3cret")
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "DSFT_API_KEY" not in result.output
