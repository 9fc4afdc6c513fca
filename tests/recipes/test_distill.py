"""Distillation: KL to a teacher's logits mixed with the LM loss; the teacher is the base with another adapter."""
from __future__ import annotations

import pytest
import torch


def test_distill_loss_is_the_lm_loss_plus_kl_to_the_teacher(home):
    from dsft.base import load_base
    from dsft.eval.losses import lm_loss
    from dsft.recipes.distill import Teacher, distill_loss

    student = load_base("tiny-deepseek-v2", device="cpu").model
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100  # only positions with a target count
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    same = Teacher(student, "itself", 4096)
    objective, lm, kl = distill_loss(student, same, batch, alpha=0.5, temperature=2.0, chunk_size=16)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert lm.item() == pytest.approx(lm_loss(student, batch).item(), rel=1e-5)
    assert objective.item() == pytest.approx(0.5 * lm.item(), rel=1e-5)

    other = load_base("tiny-deepseek-v2", device="cpu").model
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(1.5)
    objective, lm, kl = distill_loss(student, Teacher(other, "sharper", 4096), batch, alpha=1.0, temperature=1.0)
    assert kl.item() > 0 and objective.item() == pytest.approx(kl.item(), rel=1e-6)
    objective.backward()  # the student gets gradients, the teacher none
    assert student.get_output_embeddings().weight.grad is not None and other.get_output_embeddings().weight.grad is None


def test_distill_loss_is_the_same_on_every_position_while_a_graph_records(home, monkeypatch):
    """Recording a CUDA graph, the loss cannot select the labelled positions (a data-sized tensor): it runs the heads
    on all of them, the others weighing nothing - same loss, same gradients."""
    from dsft.base import load_base
    from dsft.recipes import distill

    student = load_base("tiny-deepseek-v2", device="cpu").model
    teacher = load_base("tiny-deepseek-v2", device="cpu").model
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(1.5)
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.masked_fill(torch.arange(40) < 10, -100), "attention_mask": torch.ones_like(ids)}
    head = student.get_output_embeddings().weight
    rows = []  # positions the student's head ran on (once in forward, once recomputed)
    student.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))

    def run():
        head.grad = None
        out = distill.distill_loss(student, distill.Teacher(teacher, "sharper", 4096), batch, alpha=0.5, temperature=2.0,
                                   chunk_size=16)
        out[0].backward()
        return [t.detach() for t in out], head.grad.clone()

    selected, grad = run()
    assert sum(rows) == 2 * 2 * 30  # the labelled targets (30 of 39 a row), in forward and recompute
    rows.clear()
    monkeypatch.setattr(distill, "capturing", lambda t: True)
    everywhere, grad_everywhere = run()
    assert sum(rows) == 2 * 2 * 39  # every position of both rows, forward and recompute
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(selected, everywhere))
    assert torch.allclose(grad, grad_everywhere, rtol=1e-4, atol=1e-7)


def test_distill_recipe_learns_from_the_domains_latest_adapter(home):
    import dsft
    from dsft.errors import NotFoundError

    with pytest.raises(NotFoundError, match="distill teacher 'finance' not found"):
        dsft.train(recipe="distill", max_steps=2)
    assert not (home / "runs").exists(), "a missing teacher is found before anything is written"

    teacher = dsft.train(recipe="lora", max_steps=6)
    events = []
    student = dsft.train(recipe="distill", max_steps=6, on_event=lambda kind, payload: events.append((kind, payload)))
    assert ("teacher", {"stage": "distill", "teacher": f"tiny-deepseek-v2 + {teacher.adapter}"}) in events
    m = student.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["trainable_params"] < teacher.metrics["trainable_params"]  # rank 8 instead of 16
