"""Distillation stages: the student learns from a teacher's logits as well as from the data.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * LM loss

(Hinton et al., arXiv 1503.02531; the T^2 keeps the gradient scale of the soft term independent of T.)
Both terms are taken on the positions that carry an LM target (responses, for instruction data), and
the output head runs on chunks of those positions only, so a 100k vocabulary never materialises
the whole batch's logits (as :mod:`dsft.kernels.chunked_ce`).

The teacher is the base with another registered adapter (``teacher: finance@0.1.0``; ``{domain}``
means the latest adapter of the run's domain), or another base that shares the tokenizer
(``teacher_base``), e.g. a bigger model of the same family. Logits are compared token by token,
so teacher and student must number tokens alike; the KL runs over the columns both heads have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsft.base.loading import BaseRef
from dsft.data.packing import model_inputs
from dsft.errors import IncompatibleError, UsageError
from dsft.kernels.chunked_ce import capturing
from dsft.recipes.schema import DistillSettings


@dataclass
class Teacher:
    model: Any
    name: str
    """What the teacher is, for logs: ``tiny-deepseek-v2 + finance@0.1.0``."""
    width: int
    """Logit columns shared with the student (the KL runs over ``[0, width)``)."""


def _head_width(model) -> int:
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", head.weight.shape[0]))


def load_teacher(settings: DistillSettings, *, domain: str, base: str | BaseRef, student, student_fingerprint: dict[str, Any],
                 terms: tuple[str, ...], term_start: int, registry, device) -> Teacher:
    """Load the teacher of a distill stage, frozen and in eval mode.

    Raises:
        NotFoundError: the teacher adapter or base does not exist (e.g. no adapter of the domain yet).
        IncompatibleError: the teacher adapter does not fit the teacher base.
        UsageError: the teacher numbers tokens differently from the student.
    """
    from dsft.adapters.store import load_adapter
    from dsft.base import load_base
    from dsft.errors import NotFoundError
    from dsft.registry.compat import decide

    loaded = load_base(settings.teacher_base or base, device=str(device))
    if loaded.fingerprint.get("tokenizer_hash") != student_fingerprint.get("tokenizer_hash"):
        raise UsageError(f"teacher base {loaded.ref.name} uses a different tokenizer from the student's; distillation "
                         "compares logits token by token, so pick a teacher of the same tokenizer")
    model, name, added = loaded.model, loaded.ref.name, ()
    if settings.teacher is not None:
        ref = settings.teacher.replace("{domain}", domain)
        try:
            rec = registry.resolve(ref, verify_files=True)
        except NotFoundError as exc:
            raise NotFoundError(f"distill teacher {ref!r}: {exc}; train one first (dsft train --domain {domain} --recipe lora) "
                                "or set distill.teacher to a registered adapter") from None
        decision = decide(rec.manifest, loaded.fingerprint)
        if decision.status == "incompatible":
            raise IncompatibleError(f"distill teacher {rec.ref} does not fit base {loaded.ref.name}: {'; '.join(decision.reasons)}")
        teacher = rec.parsed_manifest()
        added = teacher.added_tokens
        if terms and (added != terms or teacher.term_start != term_start):
            raise UsageError(f"distill teacher {rec.ref} adds different tokens from this run's {len(terms)} terms; distil from an "
                             "adapter of the same domain on the same base, or set adapter.terms: false")
        model = load_adapter(model, loaded.tokenizer, rec.path, verify=False)
        name = f"{name} + {rec.ref}"
    elif terms:
        raise UsageError("a teacher without an adapter does not know this run's added term tokens; set adapter.terms: false "
                         "or give distill.teacher an adapter of the same domain")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, name, min(_head_width(model), _head_width(student)))


def _hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state


def _chunk(s_head, t_head, h_s, h_t, y, width: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = s_head(h_s).float()
    with torch.no_grad():
        t = t_head(h_t).float()[:, :width] / temperature
    ce = F.cross_entropy(s, y, ignore_index=-100, reduction="sum")
    log_s = F.log_softmax(s[:, :width] / temperature, -1)
    log_t = F.log_softmax(t, -1)
    kl = ((log_t.exp() * (log_t - log_s)).sum(-1) * (y != -100)).sum()
    return ce, kl


def distill_loss(student, teacher: Teacher, batch: dict[str, torch.Tensor], alpha: float, temperature: float,
                 chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, lm_loss, kl)`` on the positions of ``batch`` with an LM target (mean per position).

    The heads run on those positions only, except while a CUDA graph records the step (a data-sized selection is
    a sync it cannot hold, :func:`dsft.kernels.chunked_ce.capturing`): then on every position, the others
    weighing nothing."""
    y = batch["labels"][:, 1:].reshape(-1)
    h_s = _hidden(student, batch)[:, :-1].reshape(len(y), -1)
    with torch.no_grad():
        h_t = _hidden(teacher.model, batch)[:, :-1].reshape(len(y), -1)
    n = (y != -100).sum().clamp(min=1)
    if not capturing(h_s):
        keep = (y != -100).nonzero().squeeze(1)
        y, h_s, h_t = y[keep], h_s[keep], h_t[keep]
    s_head = (student.get_base_model() if hasattr(student, "get_base_model") else student).get_output_embeddings()
    t_head = teacher.model.get_output_embeddings()
    ce = h_s.new_zeros((), dtype=torch.float32)
    kl = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, y.shape[0], chunk_size):
        c, k = checkpoint(_chunk, s_head, t_head, h_s[i : i + chunk_size], h_t[i : i + chunk_size], y[i : i + chunk_size],
                          teacher.width, temperature, use_reentrant=False)
        ce, kl = ce + c, kl + k
    lm, kl = ce / n, kl / n
    return alpha * temperature**2 * kl + (1 - alpha) * lm, lm, kl
