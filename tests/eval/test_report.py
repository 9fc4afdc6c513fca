"""`dsft eval --report DIR`: a self-contained page with its plots, which headless Chromium renders."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsft.cli.main import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_page_holds_its_plots_and_renders_in_chromium(home, tmp_path):
    import dsft

    adapter = dsft.train(domain="legal", max_steps=4).adapter
    out = CliRunner().invoke(app, ["eval", "--adapter", adapter, "--report", str(tmp_path / "report")])
    assert out.exit_code == 0, out.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # loss curve, perplexity bars, expert heat map
    assert {"loss.png", "perplexity.png", "experts.png"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert adapter in page and "forgot" in page

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
