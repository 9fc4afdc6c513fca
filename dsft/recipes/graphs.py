"""A training step's forward and backward replayed as one CUDA graph: the host launches a micro-batch in one call.

Eagerly, the host enqueues a step's kernels one at a time, through Python, dynamo's guards and autograd: thousands
of launches a step on the DeepSeek-V2-Lite shape, ~260 ms of host time at 1 x 2,048 tokens for ~125 ms of kernels.
Where the kernels take less time than that (one row, a 4-bit base, a small model) the GPU waits on the host. On an
H200 (``benchmarks/results/2026-12-01-h200-train-graphs.md``) a 1 x 2,048 step went from 7,821 to 15,842
tokens/s in bf16 and from 5,082 to 12,175 on an NF4 base; at 4 x 2,048 the kernels outlast the host and a graph
gains 1-10%.

How: each micro-batch shape runs :data:`WARMUP` times eagerly (compiling the layers for it and warming the
allocator, on a side stream as capture requires; with flex attention only batches whose attention mask
transformers builds as it would under capture count, :func:`recorded_alike`; variable-length attention builds
none, :func:`no_mask_built`), is then captured once - the forward, the objective and the
backward with its gradients (below) - and replayed from then on, its inputs copied into the graph's own tensors.
The optimizer step stays eager (one fused kernel). The graphs share one memory pool: a replay's outputs are read
(enqueued) before the next replay, so no graph needs another's memory to survive it.

Gradients: the first graph captured writes them (no ``.grad`` exists while it records, so its backward allocates
them in the pool, in memory its forward's activations used before), as an eager step does after the loop dropped
the last step's: the trained tensors' gradients (0.87 GiB in fp32 for ``dsft train``'s LoRA on DeepSeek-V2-Lite)
take no memory through the forward, where a step peaks (the warm-ups before it drop them too). Graphs captured
later add into those same tensors; a step whose first micro-batch is not the writing graph's keeps what came
before over its replay (a copy, added back). :meth:`StepGraphs.step_begins` tells it where a step starts.

What a graph cannot hold (a device sync, a recompile, a data-dependent shape) makes the capture fail; the step then
runs eagerly, with one warning, and the graphs stay off for the loop. ``DSFT_CUDA_GRAPHS=0`` keeps them off.
"""
from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP = 2
"""Eager runs of a shape before it is captured: the first compiles the layers' forward and backward for it."""
MAX_SHAPES = 4
"""Shapes captured at most; a loop whose micro-batches take more shapes runs the others eagerly."""
SEVERAL_PROCESSES = "several processes (collectives stay eager)"
NO_BATCH_ALIKE = "no batch took the path a graph records (rows of one example each, or no padding)"
"""Why a loop trains without graphs (``StepGraphs.summary()["off"]``)."""
MAX_MISSES = 8
"""Batches of a shape that may fail :func:`recorded_alike` before graphs stop for the loop (the check syncs)."""

Figures = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]
"""A micro-batch's (LM loss, load-balancing loss or None, router imbalance), detached."""
PartFn = Callable[[dict[str, torch.Tensor], float | torch.Tensor, float | torch.Tensor], Figures]
"""``fn(part, weight, aux_share)``: forward and backward of one micro-batch, its objective weighted by ``weight``
and its load-balancing loss by ``aux_share``; returns its figures."""
Capture = Callable[[Callable[[], Figures]], tuple[Callable[[], None], Figures]]
"""``capture(run) -> (replay, outputs)``: records ``run`` without running it; each ``replay()`` runs it again,
writing into ``outputs``."""


def graphs_off_reason(device: torch.device, *, distributed: bool) -> str | None:
    """Why a stage on ``device`` trains without CUDA graphs (None: it uses them)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if os.environ.get("DSFT_CUDA_GRAPHS", "1") == "0":
        return "DSFT_CUDA_GRAPHS=0"
    if distributed:
        return SEVERAL_PROCESSES
    return None


def cuda_capture() -> Capture:
    """A capture into CUDA graphs that share one memory pool. Unlike ``torch.cuda.graph``, a capture that fails
    leaves the stream it ran on (the eager fallback must not run there) and reports the first error, not the
    invalidated capture's."""
    pool = torch.cuda.graph_pool_handle()

    def capture(run: Callable[[], Figures]) -> tuple[Callable[[], None], Figures]:
        graph = torch.cuda.CUDAGraph()
        main, stream = torch.cuda.current_stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        # The eager warm-ups' freed blocks stay cached in the allocator's general pool, which this capture's private
        # pool cannot use: released first, a step that keeps most layers' activations fits its capture (on an H200,
        # DeepSeek-V2-Lite shape at 4 x 2,048 with no layer recomputed, ~73 GiB; capture ran out of memory without it).
        torch.cuda.empty_cache()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                outputs = run()
            except BaseException:
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()
        main.wait_stream(stream)
        return graph.replay, outputs

    return capture


def no_mask_built(part: dict[str, torch.Tensor]) -> bool:
    """Every batch records as it runs eagerly: the attention builds no mask from the data (variable-length
    attention, :mod:`dsft.kernels.varlen`)."""
    return True


def recorded_alike(part: dict[str, torch.Tensor]) -> bool:
    """Whether transformers builds ``part``'s attention mask eagerly as it does while a graph records it.

    Recording, it cannot look at the data (a device sync), so it always builds the per-example mask of packed rows
    (or the padding mask). Eagerly it drops the mask when every row holds one example (or nothing is padded),
    and a layer compiled for that recompiles inside the capture, which fails. So a shape warms up only on batches
    that take the recorded path (a device sync, during warm-up only)."""
    positions = part.get("position_ids")
    if positions is not None:
        return bool((positions[:, 1:] != positions[:, :-1] + 1).any())
    mask = part.get("attention_mask")
    return mask is not None and not bool(mask.all())


@dataclass
class _Graph:
    inputs: dict[str, torch.Tensor]
    weight: torch.Tensor
    aux_share: torch.Tensor
    outputs: Figures
    replay: Callable[[], None]

    def run(self, part: dict[str, torch.Tensor], weight: float, aux_share: float) -> Figures:
        for key, value in part.items():
            self.inputs[key].copy_(value, non_blocking=True)
        self.weight.fill_(weight)
        self.aux_share.fill_(aux_share)
        self.replay()
        return self.outputs


def _shape_key(part: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(part.items()))


class StepGraphs:
    """The training loop's micro-batches as CUDA graphs (see the module's docstring). Bind the loop's step function
    and trained tensors with :meth:`bind`, then call it like that function; :meth:`summary` says what happened."""

    def __init__(self, *, capture: Capture | None = None, warmup: int = WARMUP, max_shapes: int = MAX_SHAPES,
                 alike: Callable[[dict[str, torch.Tensor]], bool] = recorded_alike,
                 on_warning: Callable[[str], None] | None = None):
        """``on_warning(message)`` hears of a failed capture (default: a Python warning)."""
        self._capture, self._alike = capture, alike
        self._on_warning = on_warning or (lambda message: warnings.warn(message, stacklevel=4))
        self.warmup, self.max_shapes = warmup, max_shapes
        self.off: str | None = None
        """Why graphs stopped (None: they did not)."""
        self._fn: PartFn | None = None
        self._params: list[torch.Tensor] = []
        self._seen: dict[tuple, int] = {}
        self._misses: dict[tuple, int] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._side: torch.cuda.Stream | None = None
        self.captured = 0
        self.replays = 0
        self._off_for_memory = False
        """The capture that turned graphs off ran out of memory (memory freed later may let it succeed)."""
        self._writer: _Graph | None = None
        """The graph that writes the gradients (the first captured; the others add into them)."""
        self._written: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(trained tensor, the gradient the writing graph fills)."""
        self._step_started = False
        """Whether a micro-batch of the current step has run (see :meth:`step_begins`)."""

    def bind(self, fn: PartFn, params: list[torch.Tensor]) -> StepGraphs:
        self._fn, self._params = fn, params
        return self

    def step_begins(self) -> None:
        """A new optimizer step: no gradient of it exists yet, so the graph that writes the gradients need not keep
        what they held. A caller that never says so is still right; that graph's replays then copy and add back
        the gradients every time."""
        self._step_started = False

    def __call__(self, part: dict[str, torch.Tensor], weight: float, aux_share: float) -> Figures:
        assert self._fn is not None, "StepGraphs.bind() first"
        started, self._step_started = self._step_started, True
        if not started and self._writer is None:
            for p in self._params:  # zero (the loop zeroed them after the last step) and no graph holds them yet
                p.grad = None
        key = _shape_key(part)
        graph = self._graphs.get(key)
        if graph is not None:
            self.replays += 1
            if graph is self._writer:
                return self._run_writer(graph, part, weight, aux_share, started)
            return graph.run(part, weight, aux_share)
        if self.off is not None or len(self._graphs) >= self.max_shapes:
            return self._fn(part, weight, aux_share)
        if self._seen.get(key, 0) < self.warmup:
            if self._alike(part):
                self._seen[key] = self._seen.get(key, 0) + 1
            else:
                self._misses[key] = self._misses.get(key, 0) + 1
                if self._misses[key] >= MAX_MISSES and not self._seen.get(key):
                    self.off = NO_BATCH_ALIKE
            return self._warm_up(part, weight, aux_share)
        return self._capture_and_run(key, part, weight, aux_share, started)

    def _run_writer(self, graph: _Graph, part: dict[str, torch.Tensor], weight: float, aux_share: float,
                    started: bool) -> Figures:
        """Replay the graph that writes the gradients; after other micro-batches of the step (``started``) what they
        added is kept aside and added back (the graph's forward reuses the gradients' memory, its backward
        overwrites them)."""
        before = [p.grad for p, _ in self._written] if started else []
        kept = [b.clone() if b is g else b for b, (_, g) in zip(before, self._written)]
        figures = graph.run(part, weight, aux_share)
        for p, g in self._written:
            p.grad = g
        pairs = [(g, k) for (_, g), k in zip(self._written, kept) if k is not None]
        if pairs:
            torch._foreach_add_([g for g, _ in pairs], [k for _, k in pairs])
        return figures

    def _warm_up(self, part: dict[str, torch.Tensor], weight: float, aux_share: float) -> Figures:
        """An eager run on a side stream (capture requires it), one stream for the loop so its cached memory is
        reused."""
        assert self._fn is not None
        if not part["input_ids"].is_cuda:
            return self._fn(part, weight, aux_share)
        main = torch.cuda.current_stream()
        self._side = self._side or torch.cuda.Stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            figures = self._fn(part, weight, aux_share)
        main.wait_stream(self._side)
        return figures

    def _capture_and_run(self, key: tuple, part: dict[str, torch.Tensor], weight: float, aux_share: float,
                         started: bool) -> Figures:
        fn = self._fn
        assert fn is not None
        device = part["input_ids"].device
        inputs = {k: v.clone() for k, v in part.items()}
        scalars = torch.zeros(2, device=device)
        w, share = scalars[0], scalars[1]
        writes = self._writer is None
        kept = {id(p): p.grad for p in self._params if started and p.grad is not None}
        for p in self._params:
            if writes:  # no gradient while it records: its backward makes them, in the pool (the module's docstring)
                p.grad = None
            elif p.requires_grad and p.grad is None:  # it adds into these (a gradient made inside would be replaced)
                p.grad = torch.zeros_like(p)
        capture = self._capture or cuda_capture()
        self._capture = capture
        try:
            replay, outputs = capture(lambda: fn(inputs, w, share))
        except Exception as e:  # what a graph cannot hold; nothing ran, the step runs eagerly
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            self.off = f"capture failed ({type(e).__name__}: {first})"
            self._off_for_memory = isinstance(e, torch.OutOfMemoryError)
        if self.off is not None:
            # Outside the except block, and once the failed forward's frames are freed: torch < 2.12 leaves an
            # activation checkpoint whose function raised half-entered, its saved-tensor hooks active, until its
            # generator is collected; a step run before that saves its tensors there and fails in backward
            # (on an H200 with torch 2.11: CheckpointError, "Recomputed values ... have different metadata").
            gc.collect()
            self._on_warning(f"CUDA graphs off for this stage, steps run eagerly: {self.off} "
                             "(DSFT_CUDA_GRAPHS=0 skips the attempt)")
            if writes:  # a failed recording may have set gradients that were never computed: the step's own come back
                for p in self._params:
                    p.grad = kept.get(id(p))
            return fn(part, weight, aux_share)
        graph = self._graphs[key] = _Graph(inputs, w, share, outputs, replay)
        self.captured += 1
        self.replays += 1
        if not writes:
            return graph.run(part, weight, aux_share)
        self._writer = graph
        self._written = [(p, p.grad) for p in self._params if p.grad is not None]
        figures = graph.run(part, weight, aux_share)
        for p in self._params:  # the step's earlier micro-batches (run before the capture)
            before = kept.get(id(p))
            if before is not None:
                if p.grad is None:
                    p.grad = before
                else:
                    p.grad.add_(before)
        return figures

    def retrain(self) -> None:
        """What trains changed (e.g. progressive unfreezing): the graphs recorded the old set's backward, so drop
        them (each shape warms up and is captured again), and the gradients of tensors that stopped training (the
        optimizer skips a tensor without one; a kept zero gradient would still move it by momentum and decay)."""
        self._graphs.clear()
        self._seen.clear()
        self._misses.clear()
        self._writer, self._written = None, []
        for p in self._params:
            if not p.requires_grad:
                p.grad = None

    def after_out_of_memory(self) -> None:
        """A step ran out of memory and memory was freed for it (``train_steps``' ``on_out_of_memory``): the graphs
        recorded under the old memory plan go (:meth:`retrain`), and a capture that had failed for lack of memory
        is tried again."""
        self.retrain()
        if self._off_for_memory:
            self.off, self._off_for_memory = None, False

    def summary(self) -> dict:
        """``{"shapes": captured shapes, "replays": micro-batches replayed, "off": why none ran or stopped, or None}``."""
        off = self.off
        if off is None and not self.captured:
            off = NO_BATCH_ALIKE if not any(self._seen.values()) else "fewer steps than the warm-up"
        return {"shapes": self.captured, "replays": self.replays, "off": off}

    def close(self) -> None:
        """Drop the graphs and hand their memory pool back (a private pool's free blocks serve no other allocation
        until the allocator releases them: the evaluation after a stage needs that memory)."""
        had_graphs = bool(self._graphs)
        self._graphs.clear()
        self._writer, self._written = None, []
        self._capture = self._side = None
        if had_graphs and torch.cuda.is_initialized():
            gc.collect()
            torch.cuda.empty_cache()
