"""Domain packs: the shipped packs load, bad packs are reported precisely, user domains round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.domains import (
    general_pack,
    generate_corpus,
    list_domains,
    load_pack,
    new_domain,
    resolve_domain,
    validate_domain_name,
)
from dsft.domains.pack import PACKS_DIR, capitalise
from dsft.errors import DataError, NotFoundError, UsageError

VALID_PACK = """\
name: tiny
description: A tiny test domain.
default_recipe: lora
lora_targets: [attention]
terms:
  habeas corpus: a court order to bring a detained person before a judge.
  promissory estoppel: a doctrine that makes some promises binding without consideration.
fillers:
  court: [the High Court, the district court]
raw_templates:
  - "{Term} is {definition}"
  - "{Court} discussed {term} and {term2}."
instruction_templates:
  - prompt: "What is {term}?"
    response: "{Term} is {definition}"
"""


@pytest.fixture(autouse=True)
def dsft_home(home: Path) -> Path:
    """Every test here runs in a fresh $DSFT_HOME (tests/conftest.py's ``home``)."""
    return home


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- shipped packs


@pytest.mark.parametrize("name", ["finance", "legal", "medical"])
def test_each_builtin_domain_loads_with_at_least_150_distinct_terms(name):
    pack = resolve_domain(name)

    assert pack.builtin and pack.name == name and pack.default_recipe == "lora"
    assert len({term.casefold() for term, _ in pack.terms}) >= 150
    assert all(definition.endswith(".") for _, definition in pack.terms)
    assert len(pack.raw_templates) >= 25
    assert len(pack.instruction_templates) >= 15
    assert all(len(values) >= 10 for _, values in pack.fillers)


def test_general_pack_has_everyday_concepts_and_is_not_listed_as_a_domain():
    general = general_pack()

    assert len(general.terms) >= 80
    assert [pack.name for pack in list_domains()] == ["finance", "legal", "medical"]
    with pytest.raises(NotFoundError):
        resolve_domain("general")


def test_shipped_terms_are_real_professional_vocabulary():
    terms = {name: {t for t, _ in resolve_domain(name).terms} for name in ("finance", "legal", "medical")}

    assert {"collateralized debt obligation", "duration risk", "EBITDA margin"} <= terms["finance"]
    assert {"habeas corpus", "promissory estoppel"} <= terms["legal"]
    assert {"myocardial infarction", "glomerular filtration rate"} <= terms["medical"]


def test_capitalise_keeps_words_whose_case_carries_meaning():
    assert capitalise("duration risk") == "Duration risk"
    assert capitalise("mRNA vaccine") == "mRNA vaccine"
    assert capitalise("EBITDA margin") == "EBITDA margin"


# ---------------------------------------------------------------- bad packs


def test_a_valid_pack_file_loads(tmp_path):
    pack = load_pack(write(tmp_path, VALID_PACK))

    assert pack.terms[0] == ("habeas corpus", "a court order to bring a detained person before a judge.")
    assert pack.filler("court") == ("the High Court", "the district court")
    assert not pack.builtin


def test_malformed_yaml_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path, "name: tiny\ndescription: [unclosed\nterms: {}\n")

    with pytest.raises(UsageError, match=r"tiny\.yaml: malformed YAML at line \d+, column \d+"):
        load_pack(path)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, VALID_PACK.replace("description:", "descripton:"))

    with pytest.raises(UsageError) as err:
        load_pack(path)

    lines = str(err.value).splitlines()
    assert f"{path}: descripton: unknown key; did you mean description?" in lines
    assert f"{path}: description: required key is missing" in lines


def test_missing_key_alone_gives_one_line(tmp_path):
    path = write(tmp_path, VALID_PACK.replace("default_recipe: lora\n", ""))

    with pytest.raises(UsageError) as err:
        load_pack(path)

    assert str(err.value) == f"{path}: default_recipe: required key is missing"


def test_unknown_placeholder_names_the_template_and_suggests_a_fix(tmp_path):
    path = write(tmp_path, VALID_PACK.replace('"{Term} is {definition}"\n  - "{Court}', '"{Trem} is {definition}"\n  - "{Court}'))

    with pytest.raises(UsageError, match=r"raw_templates\[0\]: unknown placeholder \{Trem\}; did you mean \{Term\}\?"):
        load_pack(path)


def test_every_problem_is_reported_at_once(tmp_path):
    text = VALID_PACK.replace("lora_targets: [attention]", "lora_targets: [attention, experts]")
    text = text.replace('response: "{Term} is {definition}"', 'response: "{Term} is {defn}"')
    text = text.replace("terms:\n", "terms:\n  Habeas Corpus: the same term in other case.\n")
    path = write(tmp_path, text)

    with pytest.raises(UsageError) as err:
        load_pack(path)

    message = str(err.value)
    assert message.startswith(f"3 problems in domain pack {path}:")
    assert "lora_targets[1]: must be one of attention, shared_experts, routed_experts, got 'experts'" in message
    assert "instruction_templates[0].response: unknown placeholder {defn}" in message
    assert "terms['habeas corpus']: duplicate of term 'Habeas Corpus'" in message


def test_a_term_written_twice_is_caught_even_though_yaml_keeps_only_one(tmp_path):
    path = write(tmp_path, VALID_PACK.replace("terms:\n", "terms:\n  habeas corpus: first.\n"))

    with pytest.raises(UsageError, match=r"terms\['habeas corpus'\]: duplicate key \(first on line 6, again on line 7\)"):
        load_pack(path)


def test_wrong_types_and_empty_lists_are_named(tmp_path):
    text = VALID_PACK.replace("description: A tiny test domain.", "description: 3")
    text = text.replace("court: [the High Court, the district court]", "court: []")
    path = write(tmp_path, text)

    with pytest.raises(UsageError) as err:
        load_pack(path)

    assert "description: must be a string, got 3" in str(err.value)
    assert "fillers.court: must not be empty" in str(err.value)


# ---------------------------------------------------------------- names and lookup


@pytest.mark.parametrize("bad", ["", "a/b", "..", "../finance", "fin\\ance"])
def test_names_that_are_empty_or_look_like_paths_are_refused(bad):
    with pytest.raises(UsageError, match="empty|path separator"):
        validate_domain_name(bad)


@pytest.mark.parametrize("bad", ["Finance", "fin ance", "1finance", "x" * 65])
def test_names_must_be_lower_case_identifiers(bad):
    with pytest.raises(UsageError, match="is not valid"):
        validate_domain_name(bad)


def test_unknown_domain_lists_the_available_ones():
    with pytest.raises(NotFoundError) as err:
        resolve_domain("astrology")

    message = str(err.value)
    assert "available domains: finance, legal, medical" in message
    assert "dsft domains list" in message and "--domain path/to/domain.yaml" in message


def test_a_path_with_separators_but_no_file_is_not_taken_as_a_name():
    with pytest.raises(UsageError, match="path separator"):
        resolve_domain("packs/finance")
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_domain("missing/finance.yaml")


def test_a_pack_file_is_resolved_by_its_path(tmp_path):
    path = write(tmp_path, VALID_PACK)

    assert resolve_domain(str(path)).name == "tiny"
    assert resolve_domain(str(PACKS_DIR / "legal.yaml")).name == "legal"


# ---------------------------------------------------------------- user domains


def test_new_domain_round_trips_through_resolve_and_list(tmp_path, dsft_home):
    terms = tmp_path / "terms.txt"
    terms.write_text(
        "# reactor physics terms\n"
        "neutron moderator\ta material that slows fast neutrons so they can sustain a chain reaction\n"
        "\n"
        "control rod: a rod that absorbs neutrons to regulate the reactor's power.\n"
        "decay heat\n"
    )
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "The control rods were lowered."}\n\n{"prompt": "What is decay heat?", "response": "Heat from radioactive decay."}\n')

    path = new_domain("reactor-ops", terms, data, description="Nuclear reactor operations.")

    assert path == dsft_home / "domains" / "reactor-ops.yaml"
    pack = resolve_domain("reactor-ops")
    assert pack.description == "Nuclear reactor operations."
    assert pack.terms == (
        ("neutron moderator", "a material that slows fast neutrons so they can sustain a chain reaction."),
        ("control rod", "a rod that absorbs neutrons to regulate the reactor's power."),
        ("decay heat", ""),  # no definition given: none is invented
    )
    assert pack.data_files == (data.resolve(),)
    assert "reactor-ops" in [p.name for p in list_domains()]


def test_a_user_domain_without_templates_still_generates_filled_text(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("".join(f"widget type {i}\n" for i in range(12)))
    new_domain("widgets", terms)

    corpus = generate_corpus(resolve_domain("widgets"), n_raw=50, n_instruct=50)

    assert corpus.raw_train and corpus.instruct_train
    assert not any("{" in text for text in corpus.raw_train)


def test_new_domain_refuses_to_overwrite_a_builtin_or_an_existing_domain(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("term one\n")
    new_domain("mine", terms)

    with pytest.raises(UsageError, match="already exists as a built-in"):
        new_domain("finance", terms)
    with pytest.raises(UsageError, match="already exists at"):
        new_domain("mine", terms)


def test_new_domain_with_a_bad_jsonl_line_names_the_file_and_line(tmp_path, dsft_home):
    terms = tmp_path / "terms.txt"
    terms.write_text("term one\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fine"}) + "\n{not json\n")

    with pytest.raises(DataError, match=r"data\.jsonl line 3: bad JSON"):
        new_domain("mine", terms, data)
    assert not (dsft_home / "domains" / "mine.yaml").exists()


def test_new_domain_with_records_of_the_wrong_shape_names_the_line(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("term one\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "no response"}\n')

    with pytest.raises(DataError, match=r"data\.jsonl line 1: has prompt but no response"):
        new_domain("mine", terms, data)


def test_new_domain_reports_duplicate_and_missing_terms(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("control rod\n# comment\nControl Rod: again\n")

    with pytest.raises(DataError, match=r"terms\.txt:3: duplicate term 'Control Rod' \(first on line 1\)"):
        new_domain("mine", terms)
    with pytest.raises(NotFoundError, match="terms file"):
        new_domain("mine", tmp_path / "nope.txt")
