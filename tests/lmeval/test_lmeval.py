"""lm-evaluation-harness: the ``dsft`` lm-eval model and ``dsft eval --lm-eval``, on tasks defined here over
local JSONL (nothing is downloaded), with a synthetic finance adapter (terms + LoRA) on the tiny preset."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli.main import app

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'dsft[lmeval]')")

QUESTIONS = [
    ("The bond pays a fixed", ["coupon", "banana", "glacier"], 0),
    ("The central bank raised interest", ["rates", "trees", "songs"], 0),
    ("Equity investors own", ["shares", "clouds", "rivers"], 0),
    ("A loan that is not repaid is in", ["default", "bloom", "orbit"], 0),
    ("The portfolio manager reduced duration", ["risk", "paint", "soup"], 0),
    ("The company reported quarterly", ["earnings", "weather", "poems"], 0),
    ("Inflation erodes purchasing", ["power", "stones", "feathers"], 0),
    ("The auditor reviewed the balance", ["sheet", "beam", "wheel"], 0),
    ("A diversified portfolio lowers", ["volatility", "mountains", "whales"], 0),
    ("The treasury issued new", ["bonds", "horses", "lamps"], 0),
]


def write_tasks(directory: Path) -> Path:
    """Three tasks, one per lm-eval request type: multiple choice (loglikelihood), perplexity
    (loglikelihood_rolling) and a short generation (generate_until)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "finance_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "text": f"{q} {c[a]}."}) + "\n"
                            for q, c, a in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(common + """task: dsft_tiny_mc
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (directory / "ppl.yaml").write_text(common + """task: dsft_tiny_ppl
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (directory / "gen.yaml").write_text(common + """task: dsft_tiny_gen
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return directory


@pytest.fixture(scope="module")
def lm_home(tmp_path_factory, new_home):
    """A $DSFT_HOME with a random finance@0.1.0 (LoRA + the finance pack's terms) on tiny-deepseek-v2."""
    from dsft.base import load_base
    from dsft.testing.adapters import make_adapter

    home = new_home(tmp_path_factory.mktemp("lm_eval_home"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster than two fighting
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSFT_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("DSFT_REGISTRY_URL", raising=False)
        ref = make_adapter(load_base("tiny-deepseek-v2", device="cpu"), "finance", seed=3, b_std=0.2).ref
        yield {"home": home, "ref": ref, "tasks": write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))}
    torch.set_num_threads(before)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@needs_lm_eval
def test_tasks_score_base_and_adapter_side_by_side_and_are_recorded(lm_home):
    from dsft.base import load_base
    from dsft.lmeval.run import run_lm_eval
    from dsft.registry import open_registry

    ref = lm_home["ref"]
    loaded = load_base("tiny-deepseek-v2", device="cpu")
    with open_registry() as reg:  # a held-out figure of `dsft eval` on the same base must survive
        reg.record_eval(ref, base_fingerprint=loaded.fingerprint, metrics={"eval_domain_loss": 1.5},
                        name=loaded.ref.name, source=loaded.ref.source)
    del loaded

    result = run_lm_eval(ref, "dsft_tiny_mc,dsft_tiny_ppl,dsft_tiny_gen", include=[lm_home["tasks"]], device="cpu")
    rows = {(r["task"], r["metric"]): r for r in result["rows"]}
    assert set(rows) >= {("dsft_tiny_mc", "acc"), ("dsft_tiny_ppl", "word_perplexity"),
                         ("dsft_tiny_ppl", "bits_per_byte"), ("dsft_tiny_gen", "exact_match")}
    for key in (("dsft_tiny_mc", "acc"), ("dsft_tiny_gen", "exact_match")):
        assert 0.0 <= rows[key]["base"] <= 1.0 and 0.0 <= rows[key]["adapter"] <= 1.0
    ppl = rows[("dsft_tiny_ppl", "word_perplexity")]
    assert ppl["base"] > 1.0 and ppl["adapter"] > 1.0
    # The adapter's LoRA is really applied: its perplexity is not the base's.
    assert ppl["delta"] == pytest.approx(ppl["adapter"] - ppl["base"]) and abs(ppl["delta"]) > 1e-6
    assert rows[("dsft_tiny_mc", "acc")]["higher_is_better"] is True

    with open_registry() as reg:
        verified = [c for c in reg.compat_rows(ref) if c.status == "verified"]
    metrics = verified[0].metrics
    assert metrics["lm_eval:dsft_tiny_mc:acc"] == rows[("dsft_tiny_mc", "acc")]["adapter"]
    assert metrics["lm_eval:dsft_tiny_ppl:word_perplexity:base"] == ppl["base"]
    assert metrics["eval_domain_loss"] == 1.5  # merged, not replaced


@needs_lm_eval
def test_the_cli_prints_json_a_table_and_a_report(lm_home, tmp_path):
    args = ("eval", "--adapter", lm_home["ref"], "--lm-eval", "dsft_tiny_mc", "--lm-eval-include", str(lm_home["tasks"]),
            "--limit", "4", "--device", "cpu")
    out = invoke(*args, "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)  # lm-eval logs to stderr
    assert result["limit"] == 4 and [r["task"] for r in result["rows"]] == ["dsft_tiny_mc"]
    table = invoke(*args, "--report", str(tmp_path))
    assert table.exit_code == 0, table.output
    assert "dsft_tiny_mc" in table.output and "delta" in table.output
    page = (tmp_path / "lm_eval.html").read_text()
    assert "dsft_tiny_mc" in page and "base + adapter" in page


@needs_lm_eval
def test_the_base_scores_as_lm_evals_own_hf_model_does(lm_home):
    """The dsft model, base alone, gives the log-likelihoods lm-eval's HFLM gives on the same model (its
    reference implementation), for continuations and for rolling windows; the adapter changes them, and a
    term of the adapter that spans context and continuation ("duration" + " risk") still scores " risk"."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dsft.lmeval.model import DsftLM
    from dsft.runtime import load_base

    runtime = load_base("tiny-deepseek-v2", device="cpu")
    pairs = [(q, " " + c[0]) for q, c, _ in QUESTIONS[:4]] + [("The portfolio manager reduced duration", " risk"), ("", "Bonds")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (q + " " + c[a] + ".",), i) for i, (q, c, a) in enumerate(QUESTIONS[:3])]
    ours = DsftLM(runtime=runtime, batch_size=3)
    reference = HFLM(pretrained=runtime.model, tokenizer=runtime.tokenizer, device="cpu", batch_size=3)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), reference.loglikelihood(requests)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and greedy_a == greedy_b
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(reference.loglikelihood_rolling(rolling), rel=1e-4)
    settings = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    gen = [Instance("generate_until", {}, (q, dict(settings)), i) for i, (q, _, _) in enumerate(QUESTIONS[:3])]
    texts = ours.generate_until(gen)
    assert texts == reference.generate_until(gen) and all(texts)  # greedy: the same text

    adapted = DsftLM(runtime=runtime, adapter=lm_home["ref"], batch_size=3)
    assert adapted.tokenizer_name != ours.tokenizer_name  # lm-eval's request cache keeps them apart
    with_adapter = adapted.loglikelihood(requests)
    assert all(logp < 0 for logp, _ in with_adapter)
    assert with_adapter[0][0] != pytest.approx(ours.loglikelihood(requests[:1])[0][0], abs=1e-6)
    runtime.close()


@needs_lm_eval
def test_the_model_is_registered_as_dsft():
    import lm_eval.api.registry as registry

    from dsft.lmeval.model import DsftLM

    assert registry.get_model("dsft") is DsftLM


@needs_lm_eval
def test_an_unknown_task_is_named_in_one_line(lm_home):
    out = invoke("eval", "--adapter", lm_home["ref"], "--lm-eval", "dsft_tiny_mc,no_such_task_xyz",
                 "--lm-eval-include", str(lm_home["tasks"]))
    assert out.exit_code != 0
    assert "no_such_task_xyz" in out.output and "lm-eval ls tasks" in out.output
    assert "dsft_tiny_mc" not in out.output.replace("no_such_task_xyz", "")  # only the unknown one is named
    assert len(out.output.strip().splitlines()) == 1, out.output


def test_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    out = invoke("eval", "--adapter", "finance@0.1.0", "--lm-eval", "hellaswag")
    assert out.exit_code != 0
    assert "pip install 'dsft[lmeval]'" in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
