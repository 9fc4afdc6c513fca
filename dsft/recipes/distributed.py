"""Several processes training one adapter: ranks, data shards, gradient sync and rank-0-only writes.

``dsft train --num-gpus N`` (or ``accelerate launch -m dsft.cli train ...``, or ``torchrun -m dsft.cli
train ...``) starts N copies of the same run; this module makes them one run:

* every rank builds the same stage data (same seed) and takes its share of each *global* batch (the
  recipe's ``batch_size``), so a step sees exactly the examples of a single-process run;
* the loss is the mean over the global batch's target tokens: each rank weights its own mean by its
  share of them and gradients are averaged over ranks (FSDP2's reduce-scatter, or one all-reduce for
  plain data parallelism), which is the single-process gradient; the router's load-balancing loss
  takes the global batch's routing counts (:meth:`dsft.base.router.RouterProbe.aux_loss_global`);
* rank 0 alone writes (run directory, checkpoints, the adapter, the registry rows) and reports
  progress; the others wait and receive its result, or its error, by broadcast (:meth:`Dist.on_main`);
* held-out evaluation splits its examples over the ranks and sums.

Which sharding runs comes from the launcher's environment: ``ACCELERATE_USE_FSDP`` (an accelerate config
with ``distributed_type: FSDP``) -> FSDP2 (:mod:`dsft.base.sharding`); ``ACCELERATE_USE_DEEPSPEED`` ->
DeepSpeed ZeRO-3; anything else (``MULTI_GPU``, torchrun) -> replicated weights, all-reduced gradients.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from dsft.errors import UsageError

T = TypeVar("T")
DEEPSPEED_HINT = "pip install deepspeed (it builds its ops for your CUDA toolkit), or use --backend fsdp"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def split_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of ``n``: contiguous, sizes differing by at most one (``torch.tensor_split``'s split)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return slice(lo, lo + q + (1 if rank < r else 0))


def check_deepspeed() -> None:
    """Where ``--backend deepspeed`` stops, before any process starts.

    Raises:
        UsageError: DeepSpeed is missing (with the install line); or it is installed, but dsft's loop does not
            run under ZeRO-3 yet: its fast expert LoRA reads the fused expert weights from the LoRA wrapper,
            outside the experts module's own forward, where ZeRO-3 would not have gathered them.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UsageError(f"--backend deepspeed needs DeepSpeed, which is not installed: {DEEPSPEED_HINT}") from None
    raise UsageError("--backend deepspeed: training under ZeRO-3 is not supported yet (the expert LoRA reads weights "
                     "outside their modules' forward); use --backend fsdp")


@dataclass(frozen=True)
class FsdpSettings:
    """The parts of accelerate's FSDP settings dsft uses (the rest of the file is accelerate's)."""

    wrap: tuple[str, ...] = ()
    """Decoder-layer class names to shard as units; empty: the architecture table's."""
    reshard_after_forward: bool = True
    offload: bool = False

    @staticmethod
    def from_accelerate() -> FsdpSettings:
        """Read from the environment ``accelerate launch`` sets from its config file (``FSDP_*``)."""
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise UsageError(f"dsft shards with FSDP2; set fsdp_version: 2 in the accelerate config (it says {plugin.fsdp_version})")
        return FsdpSettings(tuple(plugin.transformer_cls_names_to_wrap or ()), bool(plugin.reshard_after_forward),
                            type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy")


@dataclass
class Dist:
    """This process's place in the run; ``Dist()`` is the single-process run, where every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharding: str = "none"
    """none | ddp | fsdp | deepspeed"""
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device: str | None = None) -> Dist:
        """The run this process belongs to, from the launcher's environment (``WORLD_SIZE``, ``RANK``, ...);
        joins the process group (NCCL on GPUs, gloo on CPU) through accelerate's ``PartialState``.

        Raises:
            UsageError: DeepSpeed requested but not installed; an FSDP config that is not FSDP2.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Dist()
        sharding = "fsdp" if _env_true("ACCELERATE_USE_FSDP") else "deepspeed" if _env_true("ACCELERATE_USE_DEEPSPEED") else "ddp"
        if sharding == "deepspeed":
            check_deepspeed()
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        fsdp = FsdpSettings.from_accelerate() if sharding == "fsdp" else FsdpSettings()
        return Dist(state.process_index, state.num_processes, state.local_process_index, sharding, fsdp)

    def close(self) -> None:
        """Leave the process group (at the end of a process: gloo's threads abort an exit that skips this)."""
        import torch.distributed as td

        if self.enabled and td.is_initialized():
            # Leave together: a rank that exits while another still holds its gloo connections can abort that one.
            td.barrier()
            td.destroy_process_group()

    def device(self, requested: str | None) -> str | None:
        """The device this rank trains on: its own GPU (``cuda:<local rank>``) unless ``requested`` says otherwise.

        A single process asked for ``"cuda"`` gets ``"cuda:0"`` too: ``torch.cuda.set_device`` needs an index
        (a world of one under torchrun or accelerate used to fail there). ``None`` without a launcher stays
        ``None`` (the caller's default device)."""
        if requested not in (None, "cuda") or (requested is None and not self.enabled):
            return requested
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if self.enabled else requested

    # --- collectives ---------------------------------------------------------------------------

    @property
    def _comm_device(self) -> torch.device:
        import torch.distributed as td

        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        return self.all_sum_tensor(t).tolist()

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (a new tensor; no gradient flows through it)."""
        if not self.enabled:
            return t.detach()
        import torch.distributed as td

        out = t.detach().clone()
        td.all_reduce(out)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.enabled:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result, or raises its error (so no rank is left
        waiting for one that failed)."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.main:
            try:
                result = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
                error, result = exc, ("error", exc)
                try:
                    pickle.dumps(exc)
                except Exception:  # an unpicklable error still reaches the other ranks, as text
                    result = ("error", RuntimeError(f"rank 0: {type(exc).__name__}: {exc}"))
        got = self.broadcast(result)
        if error is not None:
            raise error
        if got[0] == "error":
            got[1].from_rank0 = True  # rank 0 reports it; the CLI of the other ranks stays quiet
            raise got[1]
        return got[1]

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The body runs on each machine's first rank, then on the others (e.g. building a preset once per disk)."""
        if self.enabled and self.local_rank != 0:
            self.barrier()
        yield
        if self.enabled and self.local_rank == 0:
            self.barrier()

    # --- model and data ------------------------------------------------------------------------

    def prepare(self, model, spec) -> list[str]:
        """Make ``model`` (adapter attached) ready for this run: FSDP2 units, or (replicated weights) rank 0's
        adapter initialisation on every rank. Returns the FSDP units (empty otherwise)."""
        if not self.enabled:
            return []
        if self.sharding == "fsdp":
            from dsft.base.sharding import shard_model

            return shard_model(model, spec, wrap=self.fsdp.wrap, reshard_after_forward=self.fsdp.reshard_after_forward,
                               offload=self.fsdp.offload)
        import torch.distributed as td

        # Same seed, same init on every rank; broadcasting the (small) adapter makes that a guarantee.
        for name, p in model.named_parameters():
            if "lora_" in name or name.endswith(".rows"):
                td.broadcast(p.data, src=0)
        return []

    def eval_share(self, examples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of held-out ``examples``, padded to the same count on every rank with rows that
        count no tokens (labels -100): under FSDP every rank must run the same number of forwards."""
        if not self.enabled:
            return examples
        n = examples["input_ids"].shape[0]
        per = -(-n // self.world)
        lo, hi = min(self.rank * per, n), min(self.rank * per + per, n)
        part = {k: v[lo:hi] for k, v in examples.items()}
        if hi - lo < per:
            filler = {k: v[:1].expand(per - (hi - lo), *v.shape[1:]) for k, v in examples.items()}
            filler["labels"] = torch.full_like(filler["labels"], -100)
            part = {k: torch.cat([part[k], filler[k]]) for k in part}
        return part

    def step_sync(self, examples, batch_size: int) -> StepSync | None:
        """What :func:`dsft.recipes.loop.train_steps` needs to make this rank's step a share of the global one."""
        return StepSync(self, examples, batch_size) if self.enabled else None


class StepSync:
    """The global-batch arithmetic of one stage, for ``train_steps``.

    Every rank holds the whole stage's examples, so the global batch's token counts are known locally:
    only the routing loads and the reported loss need communication.
    """

    def __init__(self, dist: Dist, examples, batch_size: int):
        self.dist, self.batch_size = dist, batch_size
        self.targets = (examples.labels[:, 1:] != -100).sum(1)
        self.tokens = examples.attention_mask.sum(1)
        self.expert_masks: list[tuple[torch.nn.Parameter, int, torch.Tensor, int]] = []
        """ESFT under FSDP: ``(param, n_experts, index, dim)`` whose gradients are masked after backward
        (FSDP2 fills the shards' gradients directly, so tensor hooks on them never run)."""

    def _rows(self, step: int) -> tuple[slice, slice]:
        lo = step * self.batch_size
        n = min(self.batch_size, len(self.targets) - lo)
        mine = split_rows(n, self.dist.rank, self.dist.world)
        return slice(lo, lo + n), slice(lo + mine.start, lo + mine.stop)

    def loss_weight(self, step: int) -> float:
        """Factor on this rank's mean loss so that the ranks' average is the global batch's mean."""
        everyone, mine = self._rows(step)
        return self.dist.world * int(self.targets[mine].sum()) / max(1, int(self.targets[everyone].sum()))

    def aux_loss(self, probe) -> torch.Tensor | None:
        aux = probe.aux_loss_global(self.dist.all_sum_tensor)
        return None if aux is None else aux * self.dist.world  # gradients are averaged over ranks, not summed

    def after_backward(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average gradients over ranks (FSDP2 did that already) and mask ESFT's experts."""
        if self.dist.sharding == "fsdp":
            from dsft.adapters.esft import mask_expert_grad_

            for p, n_experts, idx, dim in self.expert_masks:
                mask_expert_grad_(p, n_experts, idx, dim)
            return
        import torch.distributed as td

        # A parameter gets a gradient on every rank or on none (all ranks run the same modules), but check:
        # a rank that skipped one would otherwise pair the wrong tensors in the flat all-reduce.
        flags = self.dist.all_sum_tensor(torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                                                      device=self.dist._comm_device))
        with_grad = [p for p, f in zip(params, flags.tolist()) if f]
        if not with_grad:
            return
        for p in with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in with_grad]
        flat = torch._utils._flatten_dense_tensors(grads)
        td.all_reduce(flat)
        flat /= self.dist.world
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def metrics(self, step: int, lm: float, aux: float | None) -> tuple[float, float | None, int]:
        """(mean LM loss over the global batch, its load-balancing loss, its tokens) for the step's log line."""
        everyone, mine = self._rows(step)
        share = int(self.targets[mine].sum()) / max(1, int(self.targets[everyone].sum()))
        lm_sum, aux_sum = self.dist.all_sum([lm * share, (aux or 0.0) / self.dist.world])
        return lm_sum, (aux_sum if aux is not None else None), int(self.tokens[everyone].sum())
