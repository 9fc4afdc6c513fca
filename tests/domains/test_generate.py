"""Synthetic corpora: deterministic, split cleanly into train and held-out, and fully filled in."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.domains import corpus_text_for_tokenizer, general_pack, generate_corpus, resolve_domain


@pytest.fixture(autouse=True)
def dsft_home(home: Path) -> Path:
    """Every test here runs in a fresh $DSFT_HOME (tests/conftest.py's ``home``)."""
    return home


def as_bytes(corpus) -> bytes:
    return json.dumps(corpus.__dict__, sort_keys=True).encode()


def test_the_same_seed_gives_byte_identical_corpora():
    pack = resolve_domain("finance")

    assert as_bytes(generate_corpus(pack, seed=7)) == as_bytes(generate_corpus(resolve_domain("finance"), seed=7))
    assert as_bytes(generate_corpus(pack, seed=7)) != as_bytes(generate_corpus(pack, seed=8))


def test_asking_for_more_instructions_leaves_the_raw_documents_unchanged():
    pack = resolve_domain("legal")

    small, large = generate_corpus(pack, n_instruct=100), generate_corpus(pack, n_instruct=300)

    assert small.raw_train == large.raw_train


@pytest.mark.parametrize("name", ["finance", "legal", "medical"])
def test_heldout_documents_and_prompts_never_occur_in_train(name):
    corpus = generate_corpus(resolve_domain(name), n_raw=1000, n_instruct=1000, heldout_fraction=0.1)

    assert len(corpus.raw_train) == 900 and len(corpus.raw_heldout) == 100
    assert len(corpus.instruct_train) == 900 and len(corpus.instruct_heldout) == 100
    assert not set(corpus.raw_heldout) & set(corpus.raw_train)
    assert not {p["prompt"] for p in corpus.instruct_heldout} & {p["prompt"] for p in corpus.instruct_train}


@pytest.mark.parametrize("name", ["finance", "legal", "medical", "general"])
def test_instruction_pairs_and_documents_are_fully_filled(name):
    pack = general_pack() if name == "general" else resolve_domain(name)
    corpus = generate_corpus(pack, n_raw=300, n_instruct=500)

    for pair in corpus.instruct_train + corpus.instruct_heldout:
        assert set(pair) == {"prompt", "response"}
        assert pair["prompt"] and pair["response"]
        assert "{" not in pair["prompt"] + pair["response"] and "}" not in pair["prompt"] + pair["response"]
    for doc in corpus.raw_train + corpus.raw_heldout + corpus.longtail_train:
        assert "{" not in doc and doc[0].isupper()


def test_a_document_is_a_few_sentences_about_a_pack_term():
    pack = resolve_domain("medical")
    terms = [term for term, _ in pack.terms]

    for doc in generate_corpus(pack, n_raw=100).raw_train:
        assert any(term in doc for term in terms)
        assert doc.count(". ") >= 2 and doc.endswith(".")


def test_longtail_documents_are_about_the_rarest_fifth_of_the_terms():
    pack = resolve_domain("finance")
    corpus = generate_corpus(pack, n_raw=500)

    assert len(corpus.longtail_terms) == round(len(pack.terms) * 0.2)
    assert len(corpus.longtail_train) == 50
    assert all(any(term in doc for term in corpus.longtail_terms) for doc in corpus.longtail_train)


def test_longtail_terms_are_rare_in_the_raw_documents():
    pack = resolve_domain("legal")
    corpus = generate_corpus(pack)
    mentions = {term: sum(term in doc for doc in corpus.raw_train) for term, _ in pack.terms}
    head = sorted(mentions.values(), reverse=True)[: len(corpus.longtail_terms)]

    assert sum(mentions[t] for t in corpus.longtail_terms) * 4 < sum(head)


def test_bad_arguments_are_refused():
    pack = resolve_domain("finance")

    with pytest.raises(ValueError, match="heldout_fraction"):
        generate_corpus(pack, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="counts"):
        generate_corpus(pack, n_raw=-1)


def test_tokenizer_text_mixes_general_and_every_builtin_domain():
    texts = corpus_text_for_tokenizer(seed=0)
    joined = "\n".join(texts)

    assert texts == corpus_text_for_tokenizer(seed=0)
    for name in ("finance", "legal", "medical"):
        assert any(term in joined for term, _ in resolve_domain(name).terms)
    assert any(term in joined for term, _ in general_pack().terms)
