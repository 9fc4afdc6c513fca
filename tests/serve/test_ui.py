"""The registry pages (`dsft ui`, `dsft serve --ui`): what they show, what they escape, what they refuse, and
that headless Chromium renders them from a real `dsft ui` process (screenshots kept under DSFT_TEST_ARTIFACTS)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

# the registry tests' builders: hand-made fingerprints and manifests, registered without torch or training
sys.path.insert(0, str(Path(__file__).parents[1] / "registry"))
from registry_helpers import fingerprint, register  # noqa: E402

from dsft.registry import Registry, open_registry  # noqa: E402
from dsft.serve.guard import allowed_hosts  # noqa: E402
from dsft.serve.ui.app import create_ui_app  # noqa: E402
from tests.serve.conftest import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<script>alert(1)</script>"
KEY = "ui-test-key"
METRICS = {
    "headline": {"set": "generated pack text", "loss_before": 7.94, "loss_after": 6.87, "ppl_before": 2803.1,
                 "ppl_after": 965.6, "ppl_reduction": 0.6555},
    "eval_loss_after": 6.87, "trainable_params": 389632,
    "stages": [{"stage": "sft", "kind": "sft", "steps": 30, "final_loss": 6.9, "tokens_per_s": 315.6,
                "eval": {"domain_loss": 6.87, "general_loss": 3.58},
                "data": {"stage": "sft", "steps": 30, "batch_size": 8, "seq_len": 128, "rows": 240,
                         "padding_share": 0.1348, "mixture": {"domain.instruct": 210}, "mixture_tokens": {"domain.instruct": 17720},
                         "sources": {"domain.instruct": {"records": {"instruction": 1800}, "examples": 1800,
                                                         "tokens": 128361, "truncated": 0, "dropped": 0}}}}],
}


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory, new_home) -> Path:
    """A registry of finance@0.1.0 (tagged production), finance@0.2.0 (with a training log and recipe file) and
    legal@0.1.0, trained on base "tiny"; a second base whose tokenizer differs and whose name is hostile, so
    every adapter (they add tokens) is incompatible with it for a stated reason; and a third, other weights, on
    which legal was evaluated (registered by that evaluation, so the finance versions have no row there)."""
    home = new_home(tmp_path_factory.mktemp("ui_home"))
    with open_registry(f"sqlite:///{home / 'registry.db'}", adapters_root=home / "adapters") as reg:
        fp = fingerprint()
        register(reg, "finance", fp)
        second = register(reg, "finance", fp, seed="y", metrics=METRICS)
        register(reg, "legal", fp, seed="z")
        reg.tag("finance@0.1.0", "production")
        reg.add_base(name=HOSTILE, source="hub:evil/base", fingerprint=fingerprint(tokenizer="t2"))
        reg.record_eval("legal@0.1.0", base_fingerprint=fingerprint(weights="w2"), name="tiny-continued",
                        source="/bases/tiny-continued", metrics={"eval_domain_loss": 5.25, "eval_headline": "user held-out"})
        d = Path(second.path)
        (d / "train_log.jsonl").write_text("".join(
            json.dumps({"stage": "sft", "step": i, "loss": 8.0 - 0.04 * i, "lr": 2e-3, "tokens_per_s": 300.0}) + "\n"
            for i in range(1, 31)) + "not json\n")
        (d / "recipe.yaml").write_text(f"name: lora\ndescription: {HOSTILE}\nstages:\n- name: sft\n  lr: 0.002\n")
    return home


@pytest.fixture(scope="module")
def reg(ui_home: Path) -> Iterator[Registry]:
    with open_registry(f"sqlite:///{ui_home / 'registry.db'}", adapters_root=ui_home / "adapters") as r:
        yield r


@pytest.fixture(scope="module")
def client(reg: Registry) -> TestClient:
    return TestClient(create_ui_app(reg))


def test_the_pages_show_what_the_registry_holds(client):
    index = client.get("/ui")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    page = index.text
    for text in ("finance", "legal", "0.1.0", "0.2.0", "production", "(newest)", "read-only", "2803", "965.6"):
        assert text in page, text
    assert page.count('href="/ui/adapters/finance/') == 2 and 'href="/ui/adapters/legal/0.1.0"' in page
    assert "default-src 'none'" in index.headers["content-security-policy"]  # no script runs, whatever slips through

    matrix = client.get("/ui/compat").text
    assert matrix.count(">verified</span>") == 4 and matrix.count(">incompatible</span>") == 3  # own base; the re-tokenized one
    assert matrix.count("no row: not checked against this base") == 2  # the base legal's evaluation registered
    assert "tokenizer changed" in matrix and "retrain on this base" in matrix and "hub:evil/base" in matrix

    detail = client.get("/ui/adapters/finance/0.2.0")
    assert detail.status_code == 200
    d = detail.text
    assert "<svg" in d and "<polyline" in d and "step 30" in d  # the training curve, drawn from train_log.jsonl
    assert "1 line(s) skipped" in d  # the damaged log line is said, not fatal
    assert "domain.instruct" in d and "13.5%" in d and "1,800 instruction" in d  # the data plan
    assert "65.5% lower" in d and "evaluated on this base version" in d and "tokenizer changed" in d
    assert "name: lora" in d  # recipe.yaml as written
    assert "<form" not in d  # read-only: no forms without an API key
    first = client.get("/ui/adapters/finance/0.1.0").text
    assert "No training log" in first and '&quot;lr&quot;: 0.0001' in first  # no file: the recipe the registry recorded
    legal = client.get("/ui/adapters/legal/0.1.0").text
    assert "Recorded on tiny-continued" in legal and "eval_domain_loss" in legal and "5.25" in legal  # dsft eval's figures


def test_hostile_names_and_file_text_are_escaped(client):
    for url in ("/ui", "/ui/compat", "/ui/adapters/finance/0.2.0"):
        text = client.get(url).text
        assert HOSTILE not in text, url
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in client.get("/ui/compat").text
    assert "description: &lt;script&gt;" in client.get("/ui/adapters/finance/0.2.0").text


def test_unknown_adapters_and_bad_addresses(client):
    missing = client.get("/ui/adapters/finance/9.9.9")
    assert missing.status_code == 404 and "finance@9.9.9" in missing.text and "<html" in missing.text
    assert client.get("/ui/adapters/nosuch/0.1.0").status_code == 404
    assert client.get("/ui/adapters/finance/production").status_code == 400  # a page names a version, not a tag
    assert client.get("/ui/adapters/Finance%3Cb%3E/0.1.0").status_code == 400
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"


def test_changes_are_refused_without_the_key(reg, client):
    form = {"op": "set", "tag": "stable", "version": "0.2.0", "key": KEY}
    assert client.post("/ui/adapters/finance/tags", data=form).status_code == 415  # the guard: no form posts
    assert client.post("/ui/adapters/finance/tags", json=form).status_code == 403  # read-only pages
    keyed = TestClient(create_ui_app(reg, api_key=KEY))
    assert keyed.post("/ui/adapters/finance/tags", data={**form, "key": "wrong"}).status_code == 401
    assert keyed.post("/ui/adapters/finance/tags", data={k: v for k, v in form.items() if k != "key"}).status_code == 401
    assert "stable" not in reg.resolve("finance@0.2.0").tags


def test_with_the_key_tags_are_set_and_removed(reg):
    keyed = TestClient(create_ui_app(reg, api_key=KEY))
    page = keyed.get("/ui/adapters/legal/0.1.0").text
    assert '<form method="post" action="/ui/adapters/legal/tags">' in page and 'type="password" name="key"' in page
    done = keyed.post("/ui/adapters/legal/tags", data={"op": "set", "tag": "stable", "version": "0.1.0", "key": KEY},
                      follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/ui/adapters/legal/0.1.0"
    assert reg.resolve("legal@stable").version == "0.1.0"
    bad = keyed.post("/ui/adapters/legal/tags", data={"op": "set", "tag": "latest", "version": "0.1.0", "key": KEY})
    assert bad.status_code == 400 and "reserved" in bad.text
    keyed.post("/ui/adapters/legal/tags", data={"op": "remove", "tag": "stable", "version": "0.1.0", "key": KEY})
    assert reg.resolve("legal@0.1.0").tags == ()


def test_pages_refuse_another_host_even_with_a_key(reg):
    """A DNS-rebinding page must not read the registry (its paths, metrics) through the user's browser."""
    for key in (None, KEY):
        c = TestClient(create_ui_app(reg, api_key=key, hosts=allowed_hosts("127.0.0.1", 8765)), base_url="http://evil.example")
        assert c.get("/ui").status_code == 403
        c = TestClient(create_ui_app(reg, api_key=key, hosts=allowed_hosts("127.0.0.1", 8765)), base_url="http://127.0.0.1:8765")
        assert c.get("/ui").status_code == 200
        assert c.get("/ui", headers={"Origin": "http://evil.example"}).status_code == 403


def test_serve_mounts_the_same_pages(reg):
    """`dsft serve --ui`: the serving app with the registry pages (routes only; no model is needed to list them)."""
    from dsft.serve.app import create_app

    c = TestClient(create_app(None, None, ui_registry=reg))  # type: ignore[arg-type]
    assert c.get("/ui").status_code == 200 and "legal" in c.get("/ui").text
    assert c.get("/ui/adapters/finance/0.2.0").status_code == 200
    assert TestClient(create_app(None, None)).get("/ui").status_code == 404  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ui_server(ui_home: Path) -> Iterator[str]:
    """`dsft ui --json` in a child process on a free port (no API key); its base URL."""
    with running_server(ui_home, "--json", command="ui", api_key=None, ready="/ui") as url:
        first = next(line for line in (ui_home / "server.log").read_text().splitlines() if line.startswith("{"))
        assert json.loads(first) == {"url": f"{url}/ui", "read_only": True}
        yield url


def test_dsft_ui_renders_in_headless_chromium(ui_server, tmp_path):
    page = httpx.get(f"{ui_server}/ui").text
    assert "finance" in page and "legal" in page  # the process serves this registry
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (source .ci/chromium.sh to install it); the pages were checked over HTTP only")
    artifacts = Path(os.environ.get("DSFT_TEST_ARTIFACTS") or "/tmp/dsft-test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    for name, url, size in (("registry-ui.png", f"{ui_server}/ui", "1200,520"),
                            ("registry-ui-compat.png", f"{ui_server}/ui/compat", "1200,600"),
                            ("registry-ui-adapter.png", f"{ui_server}/ui/adapters/finance/0.2.0", "1200,1800")):
        shot = tmp_path / name
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={size}", f"--screenshot={shot}", url],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # a rendered table of rows, not a blank or error page (a white page of that size is a few KB)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 15_000, (name, shot.stat().st_size)
        shutil.copy(shot, artifacts / name)


def test_the_commands_say_how_to_use_them(home):
    from typer.testing import CliRunner

    from dsft.cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["ui", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "Example: dsft ui --port 8765" in out.stdout and "DSFT_API_KEY" in out.stdout
    assert "--ui" in runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).stdout
    bad = runner.invoke(app, ["ui", "--port", "70000"])
    assert bad.exit_code != 0 and "--port must be 0-65535, got 70000" in bad.stderr
