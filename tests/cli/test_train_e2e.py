"""The main job, end to end through the real CLI: `dsft train --domain finance` on the default tiny base,
and the README's tour run verbatim after it (the printed lines must say what the README says they say)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsft.adapter_format import read_manifest, verify_files

README = Path(__file__).resolve().parents[2] / "README.md"


def dsft(*args: str, home: Path, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # COLUMNS: as wide as the README's lines, so that rich wraps nothing
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "dsft.cli", *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"dsft {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def dsft_inline(*args: str, home: Path):
    """``dsft ARGS`` in this process (the same Typer app, without a new interpreter's ~10 s of imports), for
    checks that read JSON or exit codes; the tour's printed lines are compared from real processes above."""
    from typer.testing import CliRunner

    from dsft.cli.main import app

    result = CliRunner().invoke(app, list(args), env={"DSFT_HOME": str(home)})
    assert result.exit_code == 0, f"dsft {' '.join(args)} failed ({result.exit_code}):\n{result.stderr[-3000:]}"
    return result


def tour() -> list[tuple[str, list[str]]]:
    """The README tour's console commands, in order, each with the lines the README shows it printing."""
    section = README.read_text().split("## A short tour", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
    return steps


def shape(line: str, home: Path) -> str:
    """What a printed line says without its figures, hashes, dates and home directory."""
    line = line.replace(str(home), "~/.dsft")
    line = re.sub(r"\b[0-9a-f]{12}\b", "<id>", line)
    line = re.sub(r"\d[\d,.]*\d|\d", "9", line)
    return " ".join(line.split())


def argv(command: str) -> tuple[list[str], int]:
    """A README command as arguments (without the leading ``dsft``), and the exit code its comment promises."""
    code = re.search(r"# exit code (\d+)", command)
    args = shlex.split(command, comments=True)
    assert args[0] == "dsft", command
    return args[1:], int(code.group(1)) if code else 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, new_home):
    """The README's first command, verbatim (``dsft train --domain finance``), shared by this module's tests:
    its home, its registry row and what it printed."""
    home = new_home(tmp_path_factory.mktemp("e2e_home"))
    command, _ = tour()[0]
    args, _ = argv(command)
    assert args == ["train", "--domain", "finance"], "the README's main job"
    proc = dsft(*args, home=home)
    row = json.loads(dsft_inline("registry", "show", "finance@0.1.0", "--json", home=home).stdout)
    return home, {"adapter": row["ref"], "path": row["path"], "metrics": row["metrics"], "printed": proc.stdout + proc.stderr}


def test_main_job_registers_finance_0_1_0_and_lowers_perplexity_by_20_percent(trained):
    home, result = trained
    assert result["adapter"] == "finance@0.1.0"
    m = result["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["eval_ppl_after"] <= 0.8 * m["eval_ppl_before"], m
    path = Path(result["path"])
    assert path == home / "adapters" / "finance" / "0.1.0"
    manifest = read_manifest(path)
    verify_files(path, manifest)
    assert manifest.domain == "finance" and manifest.version == "0.1.0" and manifest.kind == "lora+terms"
    assert manifest.trained_fingerprint["architecture"] == "DeepseekV2ForCausalLM"
    assert len(manifest.added_tokens) > 50
    assert {"adapter_config.json", "adapter_model.safetensors", "terms.safetensors", "recipe.yaml"} <= set(manifest.files)


def test_a_trained_adapter_records_the_shapes_it_modifies_and_its_peft_export_imports_back(trained, tmp_path):
    """The registry's shape check needs the adapter's targets (they were recorded empty once, after PEFT had renamed
    the wrapped parameters); with them, dsft's own PEFT export of a routed-expert LoRA imports back as compatible."""
    home, result = trained
    shapes = read_manifest(Path(result["path"])).target_shapes
    assert "model.layers.1.mlp.experts.gate_up_proj" in shapes and "model.layers.1.mlp.experts.down_proj" in shapes
    assert "model.layers.0.self_attn.q_proj.weight" in shapes and "model.layers.1.mlp.shared_experts.up_proj.weight" in shapes
    out = tmp_path / "finance-peft"
    dsft_inline("export", "finance@0.1.0", "--format", "peft", "--out", str(out), home=home)
    dsft_inline("registry", "import", str(out), "--domain", "finance-again", home=home)
    check = dsft_inline("registry", "check", "finance-again", "--base", "tiny-deepseek-v2", "--json", home=home)
    assert json.loads(check.stdout)["status"] == "compatible", check.stdout
    gen = dsft_inline("generate", "--adapter", "finance-again", "--max-new-tokens", "4", "What is EBITDA?", home=home)
    assert gen.stdout.strip()


def test_adapter_files_are_small_and_safetensors_only(trained):
    _, result = trained
    path = Path(result["path"])
    names = {p.name for p in path.iterdir()}
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    from safetensors.torch import load_file

    rows = load_file(str(path / "terms.safetensors"))
    manifest = read_manifest(path)
    assert rows["embed"].shape[0] == len(manifest.added_tokens)  # the added rows only, never the whole matrix


def test_plain_peft_loading_gives_the_same_logits_as_dsft(trained, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.adapters.store import load_adapter
    from dsft.adapters.terms import apply_rows_to_plain_model
    from dsft.base import load_base

    home, result = trained
    path = Path(result["path"])
    manifest = read_manifest(path)
    monkeypatch.setenv("DSFT_HOME", str(home))  # for this test only: other files share the worker process
    ours = load_base("tiny-deepseek-v2", device="cpu")
    ours_model = load_adapter(ours.model, ours.tokenizer, path)

    base_dir = home / "bases" / "tiny-deepseek-v2"
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(list(manifest.added_tokens))
    apply_rows_to_plain_model(plain, manifest.term_start, load_file(str(path / "terms.safetensors")))
    plain = PeftModel.from_pretrained(plain, path)

    text = "The collateralized debt obligation desk reviewed its duration risk."
    ids = ours.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, tok(text, return_tensors="pt").input_ids)
    assert (ids >= manifest.term_start).any(), "the text should use an added term token"
    with torch.no_grad():
        torch.testing.assert_close(ours_model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_readme_tour_runs_verbatim_and_prints_what_the_readme_shows(trained, tmp_path):
    """Every ``$ dsft`` line of the tour, in order, in the main job's home (retraining bumps the minor version,
    tags, the registry's list and checks, generate and export): the exit code the README promises, and every
    line the README shows printed (figures, hashes and paths aside; tables, progress bars and the generated
    words are not compared, ``...`` marks lines left out). `serve` and `curl` are the server tests' (tests/serve)."""
    home, result = trained
    steps = tour()
    printed = {0: result["printed"]}
    for i, (command, _) in enumerate(steps[1:], start=1):
        args, code = argv(command) if command.startswith("dsft ") else ([], 0)
        if not args or args[0] == "serve":
            continue
        proc = dsft(*args, home=home, check=False, cwd=tmp_path)
        assert proc.returncode == code, f"{command}: exit code {proc.returncode}\n{proc.stderr[-2000:]}"
        printed[i] = proc.stdout + proc.stderr
    if os.environ.get("DSFT_TEST_ARTIFACTS"):  # what the tour printed today, to refresh the README's figures from
        out_dir = Path(os.environ["DSFT_TEST_ARTIFACTS"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "readme-tour.txt").write_text("".join(f"$ {steps[i][0]}\n{printed[i]}\n" for i in sorted(printed)))
    assert "finance@0.2.0" in printed[1] and "production" in printed[3]  # the retrain and the tag, in the list
    for i, out in printed.items():
        got = {shape(line, home) for line in out.splitlines()}
        shown = steps[i][1][1:] if steps[i][0].startswith("dsft generate") else steps[i][1]  # [0]: the model's words
        for line in shown:
            if line.strip() in ("", "...") or re.search("[━┃│┏┡└]", line):
                continue
            assert shape(line, home) in got, f"README line of `{steps[i][0]}` not printed:\n  {line}\nprinted:\n{out}"


@pytest.fixture(scope="module")
def twice(tmp_path_factory, new_home):
    """The same short run with user data twice (seed 7, 3 steps), each also copied to ``--output``: the two
    runs, what ``output`` held after the first, and the directories. Shared by the two tests below, which
    read them only: each run costs ~10 s, most of it the held-out losses."""
    import dsft

    tmp = tmp_path_factory.mktemp("twice")
    data, out = tmp / "notes.jsonl", tmp / "exported"
    data.write_text("".join(f'{{"prompt": "Explain note {i}.", "response": "Note {i} concerns duration risk."}}\n' for i in range(20)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSFT_HOME", str(new_home(tmp / "home")))
        mp.delenv("DSFT_REGISTRY_URL", raising=False)
        first = dsft.train(domain="finance", max_steps=3, seed=7, data=[data], output=out)
        first_output = read_manifest(out).version
        second = dsft.train(domain="finance", max_steps=3, seed=7, data=[data], output=out)
    return {"runs": [first, second], "first_output": first_output, "output": out, "dir": tmp}


def test_same_seed_same_adapter_and_user_data_joins_the_mixture(twice):
    from safetensors.torch import load_file

    runs = twice["runs"]
    assert [r.adapter for r in runs] == ["finance@0.1.0", "finance@0.2.0"]
    assert runs[0].metrics["stages"][0]["mixture"]["user"] > 0
    a, b = (load_file(str(r.path / "adapter_model.safetensors")) for r in runs)
    assert a.keys() == b.keys()
    # CPU thread scheduling may flip the last bits of a reduction, nothing more
    assert runs[0].metrics["stages"][0]["final_loss"] == pytest.approx(runs[1].metrics["stages"][0]["final_loss"], rel=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_output_gets_a_copy_and_an_older_adapter_there_is_replaced(twice):
    first, second = twice["runs"]
    out = twice["output"]
    assert twice["first_output"] == first.adapter.split("@")[1]
    # the second run found the first's dsft adapter in `output` and replaced it atomically
    assert read_manifest(out).version == second.adapter.split("@")[1] == "0.2.0"
    verify_files(out, read_manifest(out))
    assert not any(p.name.startswith(".") for p in twice["dir"].iterdir()), "no staging leftovers"
