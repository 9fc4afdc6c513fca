"""``RuntimeBase``: one loaded base with domain adapters attached, swapped and detached at run time.

    base = dsft.load_base("tiny-deepseek-v2")
    base.attach("finance"); base.attach("legal@0.1.0")      # finance: its production tag, else the newest
    base.generate("What is duration risk?", adapter="finance").text       # answered as an instruction
    base.generate("The bond's duration", adapter="finance", raw=True)     # continued as plain text
    base.generate(["...", "...", "..."], adapters=["finance", "legal", None])   # one batch, a row per adapter
    base.detach("legal")

Adapters are attached under their full ref (``finance@0.1.0``): a second version of a domain is attached
beside the first, and each is addressed by its version; a bare ``finance`` in a request means the
attached version the ``production`` tag points at, else the newest attached one (:mod:`dsft.runtime.refs`).
Before any weight is read, the registry must say the adapter is compatible with (or verified on) this
base's fingerprint, and its files must match their sha256; otherwise attach refuses with the reasons and
nothing changes.

This module is the adapter lifecycle (what is attached, attach, detach, close); what requests do with it
(encode, make a row, run, step, generate, logits) is :mod:`dsft.runtime.requests`, mixed into ``RuntimeBase``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.terms import MultiTermEmbedding, MultiTermHead, TermTable
from dsft.base.arch import supports_fused_experts
from dsft.base.loading import LoadedBase
from dsft.errors import IncompatibleError, NotFoundError, UsageError
from dsft.runtime.fp8_experts import dequantize_experts, quantize_experts
from dsft.runtime.fused_mlp import patch_mlps, restore_mlps
from dsft.runtime.fused_norms import fuse_rms_norms, restore_norms
from dsft.runtime.fused_router import patch_routers, restore_routers
from dsft.runtime.mla_decode import patch_mla, restore_mla
from dsft.runtime.multilora import MultiLora
from dsft.runtime.records import AdapterInfo
from dsft.runtime.refs import AdapterHandle, TagCache, choose, resolve_attached, tag_version
from dsft.runtime.requests import RuntimeRequests
from dsft.runtime.static_cache import is_slot_decode
from dsft.runtime.verified_read import VERIFIED_ON_READ
from dsft.runtime.weights import AdapterWeights, extended_tokenizer, read_adapter

log = logging.getLogger("dsft.runtime")


@dataclass
class _Attached:
    info: AdapterInfo
    weights: AdapterWeights = field(repr=False)
    tokenizer: Any = field(repr=False)


class RuntimeBase(RuntimeRequests):
    """A base model that serves several domain adapters at once. Use :func:`dsft.runtime.load_base`.

    Keeps ``model``, ``tokenizer``, ``spec``, ``fingerprint`` and ``ref`` of the loaded base (what
    training uses). The model stays a plain transformers model: adapters live in the runtime's tables
    and only apply inside the runtime's own forwards. Requests (:meth:`generate`, :meth:`step`, ...)
    come from :class:`dsft.runtime.requests.RuntimeRequests`.
    """

    def __init__(self, loaded: LoadedBase, *, registry: Any = None, batch_size: int = 32, tag_ttl_s: float = 2.0,
                 fp8_experts: bool = False):
        self.loaded = loaded
        self.fp8_experts = fp8_experts
        """Routed-expert weights held in FP8 while the runtime drives the model (:mod:`dsft.runtime.fp8_experts`)."""
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.fingerprint = loaded.fingerprint
        self.ref = loaded.ref
        self.batch_size = batch_size
        self._registry = registry
        self._opened = None  # the registry this runtime opened itself (closed by close())
        self._opening = threading.Lock()  # not the batch lock: a tag lookup must not wait for a batch
        self._lock = threading.RLock()
        # Attach/detach/close announce themselves here before they wait for the lock: the engine takes the lock
        # once per decode step and would otherwise win it back every time (a lock is not fair), starving them.
        self._priority = 0
        self._priority_guard = threading.Lock()
        # Replaced, never mutated, so that requests can read it without the lock while a batch runs.
        self._attached: Mapping[str, _Attached] = {}
        self._tags = TagCache(self._tag_version, ttl_s=tag_ttl_s)
        self._lora: MultiLora | None = None
        self._table: TermTable | None = None
        self._originals: tuple[Any, Any] | None = None
        self._norms: list[torch.nn.Module] = []
        self._mla: list[torch.nn.Module] = []
        self._routers: list[torch.nn.Module] = []
        self._mlps: list[torch.nn.Module] = []
        # The batch run() keeps between calls (see dsft.runtime.requests), and the environment it was made under.
        self._idle_batch = None
        self._idle_key: tuple[str, str] | None = None
        self.model.eval()
        if fp8_experts:  # now, not on first use: the memory it frees counts when a server sizes its KV cache
            self._install()
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()

    # --- what is attached -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Attached adapters by ref (``finance@0.1.0``); a snapshot, safe to read while a batch runs."""
        return {k: a.info for k, a in self._attached.items()}

    def resolve(self, adapter: str | AdapterHandle | None) -> AdapterHandle | None:
        """The attached adapter that ``adapter`` names (``finance``, ``finance@0.1.0``, ``finance@TAG``);
        None for the plain base (``None`` or the base's name). Call once per request, at the boundary.

        Raises:
            NotFoundError: nothing attached by that name (the message lists what is).
            RegistryError: the registry could not be read to look a tag up.
        """
        if adapter is None or adapter == self.name:
            return None
        if isinstance(adapter, AdapterHandle):
            return adapter
        return resolve_attached(adapter, self.name, [a.info for a in self._attached.values()], self._tags)

    def tokenizer_for(self, adapter: str | AdapterHandle | None):
        """The tokenizer a request routed to ``adapter`` is encoded with (the base's plus that adapter's terms)."""
        handle = self.resolve(adapter)
        return self.tokenizer if handle is None else self._entry(handle).tokenizer

    def _entry(self, handle: AdapterHandle) -> _Attached:
        att = self._attached.get(handle.key)
        if att is None:
            raise NotFoundError(f"adapter {handle.key} was detached before its request ran")
        return att

    def memory(self) -> dict[str, int]:
        """Bytes held for each attached adapter's factors and term rows, by ref."""
        return {k: a.weights.nbytes() for k, a in self._attached.items()}

    # --- attach / detach ------------------------------------------------------------------------------

    def _open_registry(self):
        """The registry attach and tag lookups read: the one given, else one opened once for this runtime."""
        from dsft.registry import Registry, open_registry

        if isinstance(self._registry, Registry):
            return self._registry
        with self._opening:
            if self._opened is None:
                self._opened = open_registry(self._registry)
            return self._opened

    def _tag_version(self, domain: str, tag: str) -> str | None:
        return tag_version(self._open_registry(), domain, tag)

    def _install(self) -> None:
        """Take the model over on first use: per-row LoRA forwards, the multi-adapter embedding and head,
        RMSNorms in fewer kernels (:mod:`dsft.runtime.fused_norms`), DeepSeek-V2's attention absorbed in
        large decode steps (:mod:`dsft.runtime.mla_decode`), its router and SwiGLU MLPs in fewer kernels
        (:mod:`dsft.runtime.fused_router`, :mod:`dsft.runtime.fused_mlp`)."""
        if self._lora is not None:
            return
        layers = self.model.get_decoder().layers
        prefix = next(n for n, m in self.model.named_modules() if m is layers)
        experts = []
        for i, layer in enumerate(layers):
            try:
                layer.get_submodule(self.spec.experts_attr)
                experts.append(f"{prefix}.{i}.{self.spec.experts_attr}")
            except AttributeError:
                continue
        if self.fp8_experts and not any(supports_fused_experts(self.model.get_submodule(p)) for p in experts):
            raise UsageError(f"--fp8-experts: {self.ref.name} has no routed experts in transformers' fused layout "
                             "(gate_up_proj/down_proj) for the runtime to hold in FP8; serve it without the flag")
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        first = max(embed.num_embeddings, head.out_features, len(self.tokenizer))
        self._table = TermTable(first)
        self._originals = (embed, head)
        self.model.set_input_embeddings(MultiTermEmbedding(embed, self._table))
        self.model.set_output_embeddings(MultiTermHead(head, self._table))
        self._lora = MultiLora(self.model, experts)
        if self.fp8_experts:
            quantize_experts(self._lora.experts_modules())
        self._norms = fuse_rms_norms(self.model)
        self._mla = patch_mla(self.model, self._lora.linear_lora, is_slot_decode)
        self._routers = patch_routers(self.model)
        self._mlps = patch_mlps(self.model, self._lora)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The lock, for a change of what is attached: taken before the engine's next step (:meth:`step`)."""
        with self._priority_guard:
            self._priority += 1
        try:
            with self._lock:
                yield
        finally:
            with self._priority_guard:
                self._priority -= 1

    def attach(self, ref: str) -> AdapterInfo:
        """Attach the adapter ``ref``: ``finance`` (its ``production`` tag when there is one, else the newest
        version), ``finance@1.2.0`` or ``finance@TAG``. ``info.ref`` and ``info.via`` say what was taken.

        Another version of an attached domain is attached beside it (both are served, each by its
        version); attaching an attached version again does nothing.

        Raises:
            NotFoundError: no such adapter in the registry.
            IntegrityError: a file is missing, changed or truncated (named).
            IncompatibleError: the registry says it does not fit this base, with every reason.
            UsageError: a LoRA variant the runtime does not serve.
        """
        reg = self._open_registry()
        chosen, via = choose(reg, ref)
        if via is not None:
            log.info("%s -> %s (%s)", ref, chosen.ref, via)
        self._tags.invalidate()  # an attach often follows a tag move: requests see it from now on
        # The weights are hashed as read_adapter reads them (below): one read of each file, not two.
        rec = reg.resolve(chosen.ref, verify_files=True, hashed_when_read=VERIFIED_ON_READ)
        compat = reg.check(rec.ref, base_fingerprint=self.fingerprint, verify_files=False)  # checked just above
        if not compat.ok:
            raise IncompatibleError(f"{rec.ref} does not fit base {self.name} ({self.fingerprint['id'][:12]}): "
                                    + "; ".join(compat.reasons))
        current = self._attached.get(rec.ref)
        if current is not None:
            return replace(current.info, via=via)
        device, dtype = self.model.device, self.model.dtype
        weights = read_adapter(Path(rec.path), rec.parsed_manifest(), self.model.config, device=device, dtype=dtype)
        tokenizer = extended_tokenizer(self.tokenizer, weights.added_tokens, weights.term_start)
        with self._exclusive():
            if rec.ref in self._attached:  # attached meanwhile by another caller
                return replace(self._attached[rec.ref].info, via=via)
            self._install()
            problems = self._lora.check(weights)
            if problems:
                raise IncompatibleError(f"{rec.ref} does not fit the loaded {self.name}: " + "; ".join(problems))
            self._lora.add(rec.ref, weights)
            rng = None
            if weights.terms is not None:
                rng = self._table.add(rec.ref, weights.term_start, *weights.terms)
            info = AdapterInfo(rec.domain, rec.version, rec.path, compat.status, len(weights.added_tokens), rng,
                               weights.nbytes(), via)
            self._attached = {**self._attached, rec.ref: _Attached(info, weights, tokenizer)}
        return info

    def detach(self, adapter: str) -> AdapterInfo:
        """Detach an attached adapter (by ref, or by domain when one version of it is attached) and free its memory.

        Raises:
            NotFoundError: it is not attached. UsageError: the base itself, or a domain with several versions attached.
        """
        with self._exclusive():
            handle = self.resolve(adapter)
            if handle is None:
                raise UsageError(f"{adapter!r} is the base model; it cannot be detached")
            if "@" not in adapter:
                same = sorted(k for k, a in self._attached.items() if a.info.domain == handle.domain)
                if len(same) > 1:
                    raise UsageError(f"{adapter!r} has {len(same)} versions attached ({', '.join(same)}); "
                                     f"detach one by its version")
            info = self._detach_locked(handle.key)
            if info is None:
                raise NotFoundError(f"adapter {handle.key} is not attached")
        self._tags.invalidate()
        return info

    def _detach_locked(self, key: str) -> AdapterInfo | None:
        rest = dict(self._attached)
        att = rest.pop(key, None)
        if att is None:
            return None
        self._attached = rest
        # The idle batch's CUDA graphs hold the stacked factors they were captured with (the adapter's own tensors
        # when it was alone): dropped, or the detached adapter's memory would stay taken until the next run().
        self._idle_batch = None
        self._lora.remove(key)
        self._table.remove(key)
        info = att.info
        att.weights = None  # the tables held the only other references
        del att
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        return info

    def close(self) -> None:
        """Detach everything and give the model back plain (embedding, head and forwards restored). A request still
        generating fails at its next step (:class:`dsft.runtime.records.RuntimeClosedError`); one made later
        installs the runtime's tables again."""
        with self._exclusive():
            self._idle_batch = None  # built on the tables torn down below (its steps would fail: RuntimeRequests.step)
            for key in list(self._attached):
                self._detach_locked(key)
            if self._lora is not None:
                dequantize_experts(self._lora.experts_modules(), self.model.dtype)
                self._lora.close()
                restore_norms(self._norms)
                restore_mla(self._mla)
                restore_routers(self._routers)
                restore_mlps(self._mlps)
                self._norms, self._mla, self._routers, self._mlps = [], [], [], []
                embed, head = self._originals
                self.model.set_input_embeddings(embed)
                self.model.set_output_embeddings(head)
                self._lora = self._table = self._originals = None
        with self._opening:
            if self._opened is not None:
                self._opened.close()
                self._opened = None


def load_base(base: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, registry: Any = None, adapters: Sequence[str] = (),
              fp8_experts: bool = False) -> RuntimeBase:
    """Load a base model for serving domain adapters.

    Args:
        base: preset name, local model directory or hub id (default: the default preset).
        device, dtype: as :func:`dsft.base.load_base` (CUDA + bf16 when available, else CPU + fp32).
        registry: a SQLAlchemy URL or an open :class:`dsft.registry.Registry` (default: ``$DSFT_REGISTRY_URL``
            or ``$DSFT_HOME/registry.db``), opened once and consulted on every attach and for tags.
        adapters: refs to attach right away.
        fp8_experts: hold the routed experts' weights in FP8 (e4m3, a scale per output row): half their memory
            and of what a decode step reads; outputs move by FP8's rounding (:mod:`dsft.runtime.fp8_experts`).
    Raises:
        NotFoundError, UnsupportedModelError, UsageError (loading); what :meth:`RuntimeBase.attach` raises.
    """
    from dsft.base import DEFAULT_BASE
    from dsft.base import load_base as load_plain

    runtime = RuntimeBase(load_plain(base or DEFAULT_BASE, device=device, dtype=dtype, trust_remote_code=trust_remote_code),
                          registry=registry, fp8_experts=fp8_experts)
    for ref in adapters:
        runtime.attach(ref)
    return runtime
