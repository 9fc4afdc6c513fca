"""The training loop: one screen, no hidden machinery (the losses it minimises are in :mod:`dsft.eval.losses`)."""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsft.base.router import RouterProbe
from dsft.errors import DivergedError
from dsft.eval.losses import lm_loss
from dsft.recipes.graphs import SEVERAL_PROCESSES, StepGraphs

if TYPE_CHECKING:
    from dsft.recipes.distributed import StepSync


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    aux_loss: float
    lr: float
    tokens_per_s: float
    imbalance: float
    grad_norm: float | None = None
    """Total gradient norm before clipping (None when the stage does not clip)."""


def micro_batches(batch: dict[str, torch.Tensor], rows: int | None) -> list[dict[str, torch.Tensor]]:
    """``batch`` split into consecutive pieces of ``rows`` rows (the whole batch when ``rows`` is None or larger)."""
    n = batch["input_ids"].shape[0]
    if not rows or rows >= n:
        return [batch]
    return [{k: v[i : i + rows] for k, v in batch.items()} for i in range(0, n, rows)]


def token_shares(parts: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each micro-batch's share of the labelled (loss-taking) positions of the step; equal shares when none has any."""
    if len(parts) == 1:
        return [1.0]  # no device sync for the common case
    counts = [int((p["labels"][:, 1:] != -100).sum()) for p in parts]
    total = sum(counts)
    return [c / total for c in counts] if total else [1 / len(parts)] * len(parts)


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decays to 10% of peak
    if schedule == "linear":
        return 1.0 - 0.9 * progress
    return 1.0


LossFn = Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""``loss_fn(model, batch) -> (objective, lm_loss)``: what to minimise, and the LM loss to report."""


def default_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lm = lm_loss(model, batch)
    return lm, lm


RngState = tuple[torch.Tensor, torch.Tensor | None]


def _rng_state() -> RngState:
    """torch's RNG states, the CPU's and (once CUDA is in use) the current GPU's: what a checkpoint saves."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def _set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


@dataclass
class _Enqueued:
    """A step whose work is all enqueued, its figures (LM loss, aux loss, grad norm, tokens, router imbalance)
    on their way to the host: they are read after the next step's forward and backward are enqueued, so the
    device never waits for the host between steps (as in the decode loop's :class:`dsft.runtime.batching._Unread`)."""

    step: int
    scale: float
    has_aux: bool
    has_norm: bool
    figures: torch.Tensor
    ready: torch.cuda.Event | None
    rng: RngState | None
    """torch's RNG as this step left it (None: not kept), for ``after_step``: the next step's forward may draw from it."""

    @classmethod
    def of(cls, step: int, scale: float, has_aux: bool, has_norm: bool, figures: torch.Tensor, rng: RngState | None) -> _Enqueued:
        if figures.device.type != "cuda":
            return cls(step, scale, has_aux, has_norm, figures, None, rng)
        host = torch.empty(figures.shape, dtype=figures.dtype, pin_memory=True)
        host.copy_(figures, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(step, scale, has_aux, has_norm, host, ready, rng)

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.figures.tolist()

    @contextmanager
    def rng_as_left(self) -> Iterator[None]:
        """While active, torch's RNG is as this step left it: a checkpoint written now resumes drawing what the next
        step drew."""
        if self.rng is None:
            yield
            return
        now = _rng_state()
        _set_rng_state(self.rng)
        try:
            yield
        finally:
            _set_rng_state(now)


def _drop_partial_step(params: list[torch.Tensor], graphs: StepGraphs | None) -> None:
    """After a step failed part-way: its gradients (zeroed in place, where a graph adds into them), the failed
    forward's tensors and the allocator's cached blocks go, and captured graphs (of the old memory plan) with them."""
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    if graphs is not None:
        graphs.after_out_of_memory()
    gc.collect()  # torch < 2.12 keeps a failed activation checkpoint's hooks until its frames are collected
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def train_steps(
    model,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    peak_lrs: list[float],
    warmup: int,
    schedule: str,
    grad_clip: float,
    probe: RouterProbe,
    start_step: int = 0,
    loss_fn: LossFn = default_loss,
    before_step: Callable[[int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    after_step: Callable[[int, list[float]], None] | None = None,
    sync: StepSync | None = None,
    micro_batch: int | None = None,
    graphs: StepGraphs | None = None,
    on_out_of_memory: Callable[[], bool] | None = None,
) -> list[float]:
    """Run optimizer steps ``start_step .. steps - 1``; ``batches(step)`` returns that step's tensors on the model's device.

    The objective is ``loss_fn``'s (the causal-LM loss by default) plus the router's load-balancing loss
    times the architecture's coefficient, as in the base model's own pre-training. Every step depends
    only on its index, the model and the optimizer state, so a run resumed at ``start_step`` from a
    checkpoint continues exactly. ``before_step(step)`` runs first (e.g. progressive unfreezing);
    ``after_step(steps_done, losses)`` runs last (e.g. checkpoints). With ``sync`` (several ranks, each
    given its share of the global batch by ``batches``) the objective, the gradients and the reported
    loss and tokens are those of the global batch (:class:`dsft.recipes.distributed.StepSync`).
    With ``micro_batch``, a step's rows go through forward and backward that many at a time and the
    gradients accumulate: each micro-batch's loss is weighted by its share of the step's labelled tokens,
    so the step minimises the same token mean as one forward over all its rows. With ``graphs``
    (:class:`dsft.recipes.graphs.StepGraphs`, one process) each micro-batch shape is captured as a CUDA
    graph after its warm-up steps and replayed, and captured again when ``before_step`` changes what trains;
    ``graphs.summary()`` says what ran. ``on_out_of_memory()``: a step ran out of GPU memory; it frees what it can
    (e.g. layers that kept their activations recompute them again) and returns True to have the step run again from
    its first micro-batch, its partial gradients dropped (False: the error stands).

    A step's figures are read (one device sync) once the next step's forward and backward are enqueued: the
    device computes while the host reads, reports and prepares. So a step's ``on_step`` and ``after_step``
    run during the next step, before its optimizer step: the weights and optimizer state they see are still
    the step's own, and ``after_step`` sees torch's RNG as the step left it. A step whose loss is not finite
    raises :class:`dsft.errors.DivergedError` before its ``after_step``. With ``before_step``, the previous
    step is finished before it is called (it may change what trains), as if nothing overlapped.
    Returns this call's LM losses (global means).
    """
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    since = time.perf_counter()  # tokens/s of a step: from the previous step's figures to its own

    def finish(done: _Enqueued | None) -> None:
        """Read step ``done``'s figures, stop if they diverged, then report it and call ``after_step``."""
        nonlocal since
        if done is None:
            return
        lm, aux, norm, tokens, imbalance = done.read()
        aux_value, n_tokens = aux if done.has_aux else None, int(tokens)
        if sync is not None:  # a collective: every rank finishes the same step at the same point
            lm, aux_value, n_tokens = sync.metrics(done.step, lm, aux_value)
        if not math.isfinite(lm) or (aux_value is not None and not math.isfinite(aux_value)):
            raise DivergedError(f"step {done.step + 1}: the training loss is {lm} (aux {aux_value}), not a finite number; "
                                "stopped and registered nothing: lower the stage's lr or check its data")
        losses.append(lm)
        now = time.perf_counter()
        if on_step:
            on_step(StepInfo(done.step + 1, steps, lm, aux_value or 0.0, peak_lrs[0] * done.scale, n_tokens / (now - since),
                             imbalance, norm if done.has_norm else None))
        since = now
        if after_step:
            with done.rng_as_left():
                after_step(done.step + 1, losses)
            since = time.perf_counter()  # a checkpoint's or an evaluation's time is not the next step's

    def forward_backward(part: dict[str, torch.Tensor], weight: float | torch.Tensor,
                         aux_share: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One micro-batch's forward and backward (what a CUDA graph captures): its objective times ``weight``,
        its load-balancing loss times ``aux_share``. Returns its LM loss, aux loss and router imbalance, detached."""
        probe.reset(part.get("attention_mask"))  # padding stays out of the balancing loss
        objective, part_lm = loss_fn(model, part)
        part_aux = probe.aux_loss() if sync is None else sync.aux_loss(probe)
        if sync is not None:
            objective = objective * sync.loss_weight(step)
        loss = objective * weight
        if part_aux is not None:
            loss = loss + probe.coef * part_aux * aux_share
        loss.backward()
        return part_lm.detach(), None if part_aux is None else part_aux.detach(), probe.imbalance_tensor()

    if graphs is not None and sync is not None:
        graphs.off = SEVERAL_PROCESSES
    run = graphs.bind(forward_backward, params) if graphs is not None and graphs.off is None else forward_backward
    previous: _Enqueued | None = None
    for step in range(start_step, steps):
        if before_step:
            finish(previous)
            previous = None
            training = [p.requires_grad for p in params]
            before_step(step)
            if graphs is not None and training != [p.requires_grad for p in params]:
                graphs.retrain()  # what trains changed (progressive unfreezing): graphs anew, no gradient for the frozen
        batch = batches(step)
        parts = micro_batches(batch, micro_batch)
        weights = token_shares(parts)
        while True:
            try:
                if graphs is not None and run is not forward_backward:
                    graphs.step_begins()  # the graph that writes the gradients need not keep what they held
                lm, aux = torch.zeros((), device=batch["input_ids"].device), None
                for part, weight in zip(parts, weights):
                    part_lm, part_aux, imbalance = run(part, weight, 1 / len(parts))
                    if part_aux is not None:
                        aux = part_aux / len(parts) + (aux if aux is not None else 0)
                    lm = lm + part_lm * weight
                break
            except torch.OutOfMemoryError:
                if on_out_of_memory is None or not on_out_of_memory():
                    raise
                _drop_partial_step(params, graphs)
        if sync is not None:
            sync.after_backward(params)
        finish(previous)  # the device runs this step's backward meanwhile; its weights are still the previous step's
        scale = lr_at(step, steps, warmup, schedule)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * scale
        norm = None
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=run is forward_backward)  # graphs write or add into the gradients they recorded
        figures = [lm, aux if aux is not None else lm, norm if norm is not None else lm, batch["attention_mask"].sum(),
                   imbalance]
        previous = _Enqueued.of(step, scale, aux is not None, norm is not None,
                                torch.stack([f.to(lm.device, torch.float64) for f in figures]),
                                _rng_state() if after_step else None)
    finish(previous)
    if run is not forward_backward:
        optimizer.zero_grad(set_to_none=True)  # the gradients go now, not when the graphs do
    return losses
