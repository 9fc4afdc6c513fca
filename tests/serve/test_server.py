"""`dsft serve` over real HTTP: OpenAI-compatible answers, dynamic batching, JSON errors, auth, attach/detach."""
from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

PROMPTS = [
    "The collateralized debt obligation desk reviewed",
    "The court granted habeas corpus because",
    "Patients with myocardial infarction were",
    "A short note about the museum",
]


def complete(client: httpx.Client, model: str, prompt: str, max_tokens: int = 10) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_health_needs_no_key_but_lists_adapters_only_with_it(server, client, serve_refs):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["base"] == "tiny-deepseek-v2" and "adapters" not in health
    assert client.get("/health").json()["adapters"] == [serve_refs[k] for k in ("finance", "legal", "medical")]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny-deepseek-v2", serve_refs["finance"], serve_refs["legal"], serve_refs["medical"]]


def test_64_concurrent_requests_over_3_adapters_each_match_the_single_request(server, client, serve_refs, api_key):
    models = [serve_refs["finance"], "legal", serve_refs["medical"]]
    single = {(m, p): complete(client, m, p) for m in models for p in PROMPTS}
    before = client.get("/health").json()["engine"]
    jobs = list(itertools.islice(itertools.cycle(single), 64))

    async def burst():
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {api_key}"}, timeout=300) as c:
            return await asyncio.gather(*[
                c.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": 10, "temperature": 0})
                for m, p in jobs])

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    for (m, p), a in zip(jobs, answers):
        assert a.json()["choices"][0]["text"] == single[(m, p)], (m, p)
    after = client.get("/health").json()["engine"]
    assert after["rows"] - before["rows"] == 64
    assert after["batches"] - before["batches"] < 64 and after["largest"] > 1 and after["mixed"] > before["mixed"]
    assert len({single[(m, PROMPTS[0])] for m in models}) == 3, "the adapters should answer differently"


def test_the_openai_client_completes_and_streams_chat(server, serve_refs, client, api_key):
    from openai import OpenAI

    oa = OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    c = oa.completions.create(model="finance", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert c.model == serve_refs["finance"] and c.choices[0].text == complete(client, "finance", PROMPTS[0])
    assert c.usage.completion_tokens >= 1

    messages = [{"role": "user", "content": "What is habeas corpus?"}]
    whole = oa.chat.completions.create(model="legal", messages=messages, max_tokens=12, temperature=0)
    pieces = [ch.choices[0].delta.content or "" for ch in oa.chat.completions.create(
        model="legal", messages=messages, max_tokens=12, temperature=0, stream=True) if ch.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")


BAD = [
    ({"model": "astrology", "prompt": "x"}, 404),
    ('{"model": "finance", "prompt": ', 400),
    ('[1, 2, 3]', 400),
    ({"model": "finance"}, 400),
    ({"prompt": "x"}, 400),
    ({"model": "finance", "prompt": 42}, 400),
    ({"model": "finance", "prompt": "x", "max_tokens": 10**9}, 400),
    ({"model": "finance", "prompt": "x", "max_tokens": 0}, 400),
    ({"model": "finance", "prompt": "x", "max_tokens": -5}, 400),
    ({"model": "finance", "prompt": "x", "temperature": -1}, 400),
    ({"model": "finance", "prompt": "x", "temperature": 1e-45}, 400),
    ({"model": "finance", "prompt": "x", "seed": 18446744073709551616}, 400),
    ({"model": "finance", "prompt": "x", "top_p": 0}, 400),
    ({"model": "finance", "prompt": "x", "n": 3}, 400),
    ({"model": "finance", "prompt": "y" * 70_000}, 413),
    ({"model": "finance", "prompt": "hello " * 4000, "max_tokens": 5}, 413),
    ("x" * (2 << 20), 413),
]


@pytest.mark.parametrize("payload,status", BAD, ids=[f"{s}-{i}" for i, (_, s) in enumerate(BAD)])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(client, payload, status):
    if isinstance(payload, str):
        r = client.post("/v1/completions", content=payload, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert complete(client, "finance", PROMPTS[0], max_tokens=2)


def test_one_bad_request_among_six_concurrent_ones_fails_alone(server, client, api_key):
    good = {"model": "finance", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    bodies = [good] * 2 + [{**good, "seed": 18446744073709551616, "temperature": 0.7}] + [good] * 3

    async def burst():
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200, 200, 400, 200, 200, 200]
    assert "seed" in answers[2].json()["error"]["message"]
    assert len({a.json()["choices"][0]["text"] for i, a in enumerate(answers) if i != 2}) == 1


def test_a_client_that_leaves_has_its_completion_cancelled(server, client, api_key):
    before = client.get("/health").json()["engine"]["cancelled"]
    body = {"model": "finance", "prompt": [PROMPTS[0]] * 16, "max_tokens": 256, "ignore_eos": True, "raw": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 16 x 256 tokens are generated
        httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=1.0)
    for _ in range(100):
        if client.get("/health").json()["engine"]["cancelled"] >= before + 16:
            break
        time.sleep(0.2)
    assert client.get("/health").json()["engine"]["cancelled"] >= before + 16


def test_chat_errors_and_unknown_routes_are_json_too(client):
    r = client.post("/v1/chat/completions", json={"model": "finance", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "finance", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "finance", "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    assert client.get("/v1/nothing-here").json()["error"]["type"] == "not_found_error"


def test_a_wrong_or_missing_key_is_401(server, api_key):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api_key}):
        r = httpx.post(f"{server}/v1/completions", json={"model": "finance", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_second_version_is_served_beside_the_first_and_each_answers_by_its_ref(client, serve_refs):
    before = complete(client, "finance", PROMPTS[0])
    r = client.post("/v1/adapters", json={"ref": serve_refs["finance2"]})
    assert r.status_code == 201 and r.json()["ref"] == serve_refs["finance2"]
    assert complete(client, serve_refs["finance"], PROMPTS[0]) == before  # still served, by its version
    newest = complete(client, "finance", PROMPTS[0])  # no production tag: the newest attached version
    assert newest != before and newest == complete(client, serve_refs["finance2"], PROMPTS[0])
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert serve_refs["finance"] in ids and serve_refs["finance2"] in ids

    r = client.post("/v1/adapters", json={"ref": serve_refs["incompatible"]})
    assert r.status_code == 409 and "tokenizer changed" in r.json()["error"]["message"]
    assert client.post("/v1/adapters", json={"ref": "astrology"}).status_code == 404
    r = client.delete("/v1/adapters/finance")
    assert r.status_code == 400 and "detach one by its version" in r.json()["error"]["message"]

    assert client.delete(f"/v1/adapters/{serve_refs['finance2']}").json() == {"detached": serve_refs["finance2"]}
    assert client.post("/v1/completions", json={"model": serve_refs["finance2"], "prompt": "x"}).status_code == 404
    assert complete(client, "finance", PROMPTS[0]) == before
