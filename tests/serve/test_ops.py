"""Operating `dsft serve`: /metrics, the JSON access log, adapters resident under an LRU budget (attached on
demand, a tampered one refused for its request only), 429 when the queue is full, and a client that leaves
freeing its place. Real servers over HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.serve.conftest import API_KEY, making_adapters, running_server


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_a_completions_tokens_and_need_the_key(server, client, serve_refs):
    finance = serve_refs["finance"]
    before = scrape(client)
    r = client.post("/v1/completions", json={"model": "finance", "prompt": "Define EBITDA.", "max_tokens": 7,
                                             "ignore_eos": True, "temperature": 0})
    usage = r.json()["usage"]
    after = scrape(client)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert usage["completion_tokens"] == 7
    assert grew("dsft_completion_tokens_total") == 7 and grew("dsft_prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("dsft_adapter_tokens_total", adapter=finance, kind="completion") == 7
    assert grew("dsft_adapter_requests_total", adapter=finance) == 1
    assert grew("dsft_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("dsft_time_to_first_token_seconds_count") == 1
    assert grew("dsft_inter_token_latency_seconds_count") == 6  # between 7 tokens
    assert after[("dsft_adapters_resident", ())] >= 3 and after[("dsft_adapter_resident_bytes", (("adapter", finance),))] > 0
    assert after[("dsft_queue_length", ())] == 0 and after[("dsft_running_requests", ())] == 0
    assert after[("dsft_kv_cache_bytes", ())] > 0  # the slots stay allocated for the next requests (CPU: no budget)
    assert ("dsft_kv_budget_bytes", ()) not in after and ("dsft_engine_kv_waits_total", ()) in after
    assert httpx.get(f"{server}/metrics").status_code == 401  # it names the adapters: the key, as on /v1


def test_every_request_is_one_json_access_log_line(server, client, serve_home, serve_refs):
    r = client.post("/v1/chat/completions", headers={"X-Request-Id": "ops-test-1"},
                    json={"model": "legal", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-request-id"] == "ops-test-1"
    assert httpx.post(f"{server}/v1/completions", json={}).status_code == 401  # refused by the guard: logged too
    lines = []
    for _ in range(50):  # written once the response is sent
        lines = [json.loads(x) for x in (serve_home / "access.log").read_text().splitlines()]
        if lines and lines[-1]["status"] == 401:
            break
        time.sleep(0.1)
    line = next(x for x in lines if x["request_id"] == "ops-test-1")
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions" and line["status"] == 200
    assert line["adapter"] == serve_refs["legal"] and line["duration_ms"] > 0
    assert (line["prompt_tokens"], line["completion_tokens"]) == (r.json()["usage"]["prompt_tokens"],
                                                                  r.json()["usage"]["completion_tokens"])
    assert lines[-1]["path"] == "/v1/completions" and lines[-1]["adapter"] is None and len(lines[-1]["request_id"]) == 32


# --- a server with a budget of 2 resident adapters, attach on demand, one queued request at most --------------

@pytest.fixture(scope="module")
def budget_home(tmp_path_factory, new_home):
    """A registry of its own: finance, legal, medical and a tampered adapter (its weights changed after registering)."""
    from dsft.adapter_format import PEFT_WEIGHTS_FILE
    from dsft.testing.adapters import make_adapter

    home = new_home(tmp_path_factory.mktemp("budget_home"))
    with making_adapters(home) as loaded:
        for i, domain in enumerate(["finance", "legal", "medical", "tampered"]):
            rec = make_adapter(loaded, domain, seed=i + 1)
    target = Path(rec.path) / PEFT_WEIGHTS_FILE
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    return home


@pytest.fixture(scope="module")
def budget(budget_home):
    with running_server(budget_home, "--adapter", "finance", "--max-adapters", "2", "--load-on-demand",
                        "--max-queue", "1", "--max-batch-size", "1", "--batch-wait-ms", "0", "--max-tokens", "2000",
                        "--access-log", "off") as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
            yield c


def ask(client: httpx.Client, model: str, max_tokens: int = 3) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": max_tokens})


def resident(client: httpx.Client) -> list[str]:
    return [a["domain"] for a in client.get("/v1/adapters").json()["data"]]


@contextlib.contextmanager
def generating(client: httpx.Client, model: str, tokens: int = 1500):
    """A streamed completion of ``tokens`` tokens (1500: half a minute on the tiny base), generating inside the
    block; leaving the block disconnects it."""
    body = {"model": model, "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True, "raw": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # kept: closing the iterator (e.g. collecting it) would close the connection
        next(lines)  # its first piece of text: it is generating
        yield
        lines.close()


def test_a_request_attaches_a_registry_adapter_on_demand_and_lru_evicts_the_least_recently_used(budget):
    assert resident(budget) == ["finance"]
    r = ask(budget, "legal")  # not resident: attached on first use (registry check + sha256)
    assert r.status_code == 200 and r.json()["model"] == "legal@0.1.0"
    listing = budget.get("/v1/adapters").json()
    assert [a["domain"] for a in listing["data"]] == ["finance", "legal"]  # least recently used first
    assert all(a["bytes"] > 0 and a["last_used"] > 0 and a["in_use"] == 0 for a in listing["data"])
    assert listing["budget"]["max_adapters"] == 2 and listing["budget"]["load_on_demand"] is True

    assert ask(budget, "finance").status_code == 200  # finance used last: legal is now the least recent
    assert ask(budget, "medical").status_code == 200
    assert resident(budget) == ["finance", "medical"]
    assert scrape(budget)[("dsft_adapter_evictions_total", ())] == 1
    assert ask(budget, "astrology").status_code == 404


def test_an_adapter_in_use_is_not_evicted_even_when_least_recently_used(budget):
    assert ask(budget, "finance").status_code == 200
    assert ask(budget, "medical").status_code == 200
    assert resident(budget) == ["finance", "medical"]
    with generating(budget, "finance", tokens=100):  # finance in use; medical used more recently
        assert [a["in_use"] for a in budget.get("/v1/adapters").json()["data"]] == [1, 0]
        # (attach and detach wait for the running batch: the runtime never changes adapters under one)
        assert budget.post("/v1/adapters", json={"ref": "legal"}).status_code == 201
        assert sorted(resident(budget)) == ["finance", "legal"]  # medical went, not the finance in use


def test_a_tampered_adapter_is_refused_for_its_request_and_the_others_keep_serving(budget):
    r = ask(budget, "tampered")
    assert r.status_code == 409, r.text
    message = r.json()["error"]["message"]
    assert "tampered" in message and "sha256" in message and r.json()["error"]["code"] == "adapter_refused"
    assert "tampered" not in resident(budget)
    assert ask(budget, "finance").status_code == 200 and ask(budget, "legal").status_code == 200


def test_a_full_queue_is_429_with_retry_after_and_a_client_that_leaves_frees_its_place(budget):
    def rejected() -> float:
        return scrape(budget).get(("dsft_requests_total", (("endpoint", "/v1/completions"), ("status", "429"))), 0)

    async def burst():
        async with httpx.AsyncClient(base_url=str(budget.base_url), headers=budget.headers, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={"model": "finance", "prompt": "Hi",
                                                                          "max_tokens": 2}) for _ in range(3)])

    answers: list = []
    with generating(budget, "finance"):  # the engine is busy: one more request may wait, the rest are refused
        thread = threading.Thread(target=lambda: answers.extend(asyncio.run(burst())), daemon=True)
        thread.start()
        for _ in range(200):
            if rejected() == 2:
                break
            time.sleep(0.05)
        assert rejected() == 2
        start = time.monotonic()
    # the streaming client left: its completion stops and the request that waited is served at once
    thread.join(60)
    assert time.monotonic() - start < 10
    assert sorted(a.status_code for a in answers) == [200, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "busy"
    assert scrape(budget)[("dsft_running_requests", ())] == 0 and scrape(budget)[("dsft_queue_length", ())] == 0
    assert budget.get("/health").json()["engine"]["cancelled"] >= 1


@pytest.mark.parametrize("args,message", [
    (["--max-adapters", "0"], "--max-adapters must be >= 1"),
    (["--max-adapters", "1", "--adapter", "finance", "--adapter", "legal"], "--max-adapters is 1"),
    (["--adapter-memory", "0"], "--adapter-memory must be > 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--access-log", "/nonexistent-dir/access.log"], "--access-log /nonexistent-dir/access.log"),
])
def test_bad_budget_queue_and_log_flags_are_refused_before_the_model_loads(args, message):
    from dsft.cli.main import app

    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output, result.output
