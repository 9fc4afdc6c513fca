"""`dsft eval --report DIR`: a self-contained page with its plots, which headless Chromium renders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsft.cli.main import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _lease_lines(start: int, n: int) -> str:
    return "".join(json.dumps({"text": f"Clause {i}: the lessee pays the rent of {i % 9 + 1} hundred dollars on the first day."}) + "\n"
                   for i in range(start, start + n))


def test_report_page_holds_its_plots_and_renders_in_chromium(home, tmp_path):
    """Also the user-data path end to end (one training run serves both): a domain made with `domains new
    --data` trains on that data alone, and `eval --data` on a held-out file shows the gain as the headline."""
    import dsft
    from dsft.domains import new_domain

    (tmp_path / "terms.txt").write_text("lessee\nforce majeure\n")
    (tmp_path / "text.jsonl").write_text(_lease_lines(0, 100))
    (tmp_path / "heldout.jsonl").write_text(_lease_lines(1000, 20))
    new_domain("leases", tmp_path / "terms.txt", tmp_path / "text.jsonl")
    trained = dsft.train(domain="leases", max_steps=4)
    m = trained.metrics
    assert set(m["stages"][0]["mixture"]) == {"domain.user"}  # the user's text alone, no generated template text
    assert m["headline"]["set"] == "user held-out (20 records)" == m["heldout_sets"]["user"]  # split off, never trained
    assert m["user_loss_after"] < m["user_loss_before"]

    adapter = trained.adapter
    out = CliRunner().invoke(app, ["eval", "--adapter", adapter, "--data", str(tmp_path / "heldout.jsonl"),
                                   "--report", str(tmp_path / "report"), "--json"])
    assert out.exit_code == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["headline"] == "user" and r["user"]["set"] == "user held-out (20 records)"
    assert r["user"]["ppl_adapter"] < r["user"]["ppl_base"] and r["user"]["delta_ci"][1] < 0
    assert r["domain"]["set"] == "generated pack text" and r["general"]["set"] == "general"
    t = r["terms"]  # "lessee" once per held-out record: one token with the extension, several without
    assert t["occurrences"] == 20 and t["pieces_per_term_with"] == 1.0 < t["pieces_per_term_without"]

    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # loss curve, perplexity bars, expert heat map
    assert {"loss.png", "perplexity.png", "experts.png"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert adapter in page and "forgot" in page and "user held-out (20 records) (headline)" in page

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/chromium.sh installs it); the page was checked without rendering")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,2400", f"--screenshot={shot}",
         (tmp_path / "report" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000  # a page with images, not a blank one
    artifacts = os.environ.get("DSFT_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "eval-report.png")
