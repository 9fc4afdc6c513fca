"""Term extension: multi-piece domain terms become tokens; only their rows train."""
from __future__ import annotations

import torch

from dsft.adapters.terms import apply_rows_to_plain_model, extend_model, plan_terms, term_rows
from dsft.base import load_base

TERMS = ["collateralized debt obligation", "habeas corpus", "myocardial infarction", "the"]


def test_only_multi_piece_terms_become_tokens_initialised_as_the_mean_of_their_pieces(home):
    base = load_base("tiny-deepseek-v2", device="cpu")
    embed = base.model.get_input_embeddings().weight.detach().clone()
    plan = plan_terms(base.tokenizer, TERMS)
    assert "the" not in plan.terms and "habeas corpus" in plan.terms
    assert plan.start == len(base.tokenizer)
    extend_model(base.model, base.tokenizer, plan)
    i = plan.terms.index("habeas corpus")
    new_id = base.tokenizer.convert_tokens_to_ids("habeas corpus")
    assert new_id == plan.start + i
    torch.testing.assert_close(term_rows(base.model)["embed"][i], embed[list(plan.pieces[i])].mean(0))
    out = base.model(input_ids=torch.tensor([[5, new_id]])).logits
    assert out.shape[-1] == plan.start + len(plan.terms)


def test_training_updates_new_rows_and_never_the_base_rows(home):
    base = load_base("tiny-deepseek-v2", device="cpu")
    plan = plan_terms(base.tokenizer, TERMS)
    extend_model(base.model, base.tokenizer, plan)
    embed, head = base.model.get_input_embeddings(), base.model.get_output_embeddings()
    base_embed, base_head = embed.base.weight.detach().clone(), head.base.weight.detach().clone()
    new_before = embed.rows.detach().clone()
    for p in base.model.parameters():
        p.requires_grad_(False)
    embed.rows.requires_grad_(True)
    head.rows.requires_grad_(True)
    opt = torch.optim.AdamW([embed.rows, head.rows], lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([[5, plan.start, 7, plan.start + 1, 9, 11]])
    for _ in range(3):
        base.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(embed.base.weight, base_embed) and torch.equal(head.base.weight, base_head)
    assert not torch.equal(embed.rows, new_before)


def test_rows_written_into_a_plain_resized_model_give_the_same_logits(home):
    wrapped = load_base("tiny-deepseek-v2", device="cpu")
    plan = plan_terms(wrapped.tokenizer, TERMS)
    extend_model(wrapped.model, wrapped.tokenizer, plan)
    with torch.no_grad():
        wrapped.model.get_input_embeddings().rows.normal_()
        wrapped.model.get_output_embeddings().rows.normal_()
    plain = load_base("tiny-deepseek-v2", device="cpu").model
    apply_rows_to_plain_model(plain, plan.start, term_rows(wrapped.model))
    ids = torch.tensor([[3, plan.start, 8, plan.start + 1]])
    with torch.no_grad():
        torch.testing.assert_close(wrapped.model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_in_running_text_a_term_is_one_token_and_at_the_start_too(home):
    base = load_base("tiny-deepseek-v2", device="cpu")
    plan = plan_terms(base.tokenizer, TERMS)
    assert " habeas corpus" in plan.terms and "habeas corpus" in plan.terms
    spaced = plan.terms.index(" habeas corpus")
    assert plan.pieces[spaced] == tuple(base.tokenizer.encode(" habeas corpus", add_special_tokens=False))
    extend_model(base.model, base.tokenizer, plan)
    tok = base.tokenizer
    inside = tok.encode("The court granted habeas corpus today.", add_special_tokens=False)
    assert tok.convert_tokens_to_ids(" habeas corpus") in inside
    assert all(tok.decode([i]).strip() for i in inside)  # no lone space token before the term
    first = tok.encode("habeas corpus was granted.", add_special_tokens=False)
    assert first[0] == tok.convert_tokens_to_ids("habeas corpus")
    assert tok.decode(inside) == "The court granted habeas corpus today."

