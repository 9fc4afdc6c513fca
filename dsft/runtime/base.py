"""``RuntimeBase``: one loaded base with domain adapters attached, swapped and detached at run time.

    base = dsft.load_base("tiny-deepseek-v2")
    base.attach("finance@1.2.0"); base.attach("legal")
    base.generate("The bond's duration", adapter="finance")
    base.generate(["...", "...", "..."], adapters=["finance", "legal", None])   # one batch, a row per adapter
    base.detach("legal")

An adapter is attached under its domain: attaching another version of an attached domain swaps it in
place. Before any weight is read, the registry must say the adapter is compatible with (or verified on)
this base's fingerprint, and its files must match their sha256; otherwise attach refuses with the
reasons and nothing changes.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.terms import MultiTermEmbedding, MultiTermHead, TermTable
from dsft.base.loading import LoadedBase
from dsft.errors import IncompatibleError, NotFoundError, UsageError
from dsft.runtime.generation import FINISH_LENGTH, Row, forward_rows, run_rows
from dsft.runtime.multilora import MultiLora
from dsft.runtime.records import AdapterInfo, ContextLengthError, Generation
from dsft.runtime.weights import AdapterWeights, extended_tokenizer, read_adapter


@dataclass
class _Attached:
    info: AdapterInfo
    weights: AdapterWeights = field(repr=False)
    tokenizer: Any = field(repr=False)


class RuntimeBase:
    """A base model that serves several domain adapters at once. Use :func:`dsft.runtime.load_base`.

    Keeps ``model``, ``tokenizer``, ``spec``, ``fingerprint`` and ``ref`` of the loaded base (what
    training uses). The model stays a plain transformers model: adapters live in the runtime's tables
    and only apply inside the runtime's own forwards.
    """

    def __init__(self, loaded: LoadedBase, *, registry: Any = None, batch_size: int = 32):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.fingerprint = loaded.fingerprint
        self.ref = loaded.ref
        self.batch_size = batch_size
        self._registry = registry
        self._lock = threading.RLock()
        self._attached: dict[str, _Attached] = {}
        self._lora: MultiLora | None = None
        self._table: TermTable | None = None
        self._originals: tuple[Any, Any] | None = None
        self.model.eval()

    # --- what is attached -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Attached adapters by domain (a snapshot; safe to read while a batch runs)."""
        return {k: a.info for k, a in list(self._attached.items())}

    @property
    def eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return frozenset(i for i in ids if i is not None)

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def key_of(self, adapter: str | None) -> str | None:
        """The attached domain that ``adapter`` names (``finance``, ``finance@0.1.0``, ``finance@TAG``).

        Raises:
            NotFoundError: nothing attached by that name (the message lists what is).
        """
        if adapter is None or adapter == self.name:
            return None
        # No lock: a dict lookup is atomic, and the server asks this while a batch holds the lock.
        domain, _, version = adapter.partition("@")
        att = self._attached.get(domain)
        if att is not None and (not version or version == att.info.version):
            return domain
        if att is not None and version and not version[0].isdigit():
            try:  # a tag: ask the registry which version it points at
                with self._open_registry() as reg:
                    if reg.resolve(adapter).version == att.info.version:
                        return domain
            except Exception:  # an unknown tag is just "not attached"
                pass
        attached = ", ".join(a.ref for a in self.adapters.values()) or "none"
        raise NotFoundError(f"adapter {adapter!r} is not attached to {self.name} (attached: {attached}); attach it first")

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer a request routed to ``adapter`` is encoded with (the base's plus that adapter's terms)."""
        key = self.key_of(adapter)
        return self.tokenizer if key is None else self._attached[key].tokenizer

    def memory(self) -> dict[str, int]:
        """Bytes held for each attached adapter's factors and term rows."""
        with self._lock:
            return {k: a.weights.nbytes() for k, a in self._attached.items()}

    # --- attach / detach ------------------------------------------------------------------------------

    def _open_registry(self):
        from contextlib import nullcontext

        from dsft.registry import Registry, open_registry

        if isinstance(self._registry, Registry):
            return nullcontext(self._registry)
        return open_registry(self._registry)

    def _install(self) -> None:
        """Take the model over on first use: per-row LoRA forwards and the multi-adapter embedding and head."""
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
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        first = max(embed.num_embeddings, head.out_features, len(self.tokenizer))
        self._table = TermTable(first)
        self._originals = (embed, head)
        self.model.set_input_embeddings(MultiTermEmbedding(embed, self._table))
        self.model.set_output_embeddings(MultiTermHead(head, self._table))
        self._lora = MultiLora(self.model, experts)

    def attach(self, ref: str) -> AdapterInfo:
        """Attach the adapter ``ref`` (``finance``, ``finance@1.2.0``, ``finance@production``).

        A version of a domain that is already attached is swapped out for this one; attaching the same
        version again does nothing.

        Raises:
            NotFoundError: no such adapter in the registry.
            IntegrityError: a file is missing, changed or truncated (named).
            IncompatibleError: the registry says it does not fit this base, with every reason.
            UsageError: a LoRA variant the runtime does not serve.
        """
        with self._open_registry() as reg:
            rec = reg.resolve(ref, verify_files=True)
            compat = reg.check(rec.ref, base_fingerprint=self.fingerprint)
        if not compat.ok:
            raise IncompatibleError(f"{rec.ref} does not fit base {self.name} ({self.fingerprint['id'][:12]}): "
                                    + "; ".join(compat.reasons))
        with self._lock:
            current = self._attached.get(rec.domain)
            if current is not None and current.info.version == rec.version:
                return current.info
        device, dtype = self.model.device, self.model.dtype
        weights = read_adapter(Path(rec.path), rec.parsed_manifest(), self.model.config, device=device, dtype=dtype)
        tokenizer = extended_tokenizer(self.tokenizer, weights.added_tokens, weights.term_start)
        with self._lock:
            self._install()
            problems = self._lora.check(weights)
            if problems:
                raise IncompatibleError(f"{rec.ref} does not fit the loaded {self.name}: " + "; ".join(problems))
            self._detach_locked(rec.domain)
            self._lora.add(rec.domain, weights)
            rng = None
            if weights.terms is not None:
                rng = self._table.add(rec.domain, weights.term_start, *weights.terms)
            info = AdapterInfo(rec.domain, rec.version, rec.path, compat.status, len(weights.added_tokens), rng,
                               weights.nbytes())
            self._attached[rec.domain] = _Attached(info, weights, tokenizer)
            return info

    def detach(self, adapter: str) -> AdapterInfo:
        """Detach an attached adapter (by domain or ref) and free its memory.

        Raises:
            NotFoundError: it is not attached.
        """
        with self._lock:
            key = self.key_of(adapter)
            if key is None:
                raise UsageError(f"{adapter!r} is the base model; it cannot be detached")
            return self._detach_locked(key)

    def _detach_locked(self, key: str) -> AdapterInfo | None:
        att = self._attached.pop(key, None)
        if att is None:
            return None
        self._lora.remove(key)
        self._table.remove(key)
        info = att.info
        att.weights = None  # the tables held the only other references
        del att
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        return info

    def close(self) -> None:
        """Detach everything and give the model back plain (embedding, head and forwards restored)."""
        with self._lock:
            for key in list(self._attached):
                self._detach_locked(key)
            if self._lora is not None:
                self._lora.close()
                embed, head = self._originals
                self.model.set_input_embeddings(embed)
                self.model.set_output_embeddings(head)
                self._lora = self._table = self._originals = None

    # --- requests -------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int], adapter: str | None = None, *, chat: bool = False) -> list[int]:
        """Token ids of ``prompt`` as a request routed to ``adapter`` sees them (local ids)."""
        if not isinstance(prompt, str):
            return list(prompt)
        tok = self.tokenizer_for(adapter)
        if chat:
            from dsft.runtime.chat import encode_messages

            return encode_messages(tok, [{"role": "user", "content": prompt}])
        return list(tok(prompt, add_special_tokens=True)["input_ids"])

    def make_row(self, prompt_ids: list[int], adapter: str | None, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                 on_text: Callable[[str], bool | None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Row:
        """A row for :meth:`run`; ``prompt_ids`` are in ``adapter``'s tokenizer's ids."""
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {top_p}")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.max_context} tokens; shorten the prompt or ask for fewer tokens")
        key = self.key_of(adapter)
        tok = self.tokenizer if key is None else self._attached[key].tokenizer
        return Row(list(prompt_ids), key, tok, max_new_tokens, temperature, top_p, seed, tuple(stop), self.eos_ids,
                   ignore_eos, on_text, cancelled)

    def run(self, rows: list[Row]) -> None:
        """Generate a batch of prepared rows together (the engine's entry point)."""
        with self._lock:
            for row in rows:
                if row.key is not None and row.key not in self._attached:
                    raise NotFoundError(f"adapter {row.key!r} was detached before its request ran")
            self._install()
            run_rows(self.model, self._table, self._lora, rows, self._pad_id, self._originals[1].out_features)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        adapter: str | None = None,
        adapters: Sequence[str | None] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        chat: bool = False,
        on_text: Callable[[int, str], None] | None = None,
    ) -> Generation | list[Generation]:
        """Generate from one prompt or a batch.

        Args:
            prompts: a prompt, or a list of prompts (one batch).
            adapter: the adapter for every row (domain or ref; None = the plain base).
            adapters: one adapter per row instead (None entries = the plain base): a mixed batch in
                which each row gets exactly what it would get with only its adapter attached.
            max_new_tokens, temperature, top_p, seed, stop: per-row limits and sampling (temperature 0 = greedy).
            ignore_eos: keep going past the end-of-sequence token (benchmarks).
            chat: wrap each prompt as a user turn in the instruction format the adapters were trained on.
            on_text: called as ``on_text(row, piece)`` while text is generated (streaming).
        Returns:
            A :class:`Generation` for a single prompt, else a list in prompt order.
        Raises:
            NotFoundError: an adapter that is not attached. UsageError: bad limits or a prompt too long.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if adapters is not None and adapter is not None:
            raise UsageError("give either adapter= (one for all rows) or adapters= (one per row), not both")
        names = list(adapters) if adapters is not None else [adapter] * len(texts)
        if len(names) != len(texts):
            raise UsageError(f"adapters= has {len(names)} entries for {len(texts)} prompts")
        results: list[Generation] = []
        with self._lock:
            for lo in range(0, len(texts), self.batch_size):
                rows = []
                for i in range(lo, min(lo + self.batch_size, len(texts))):
                    callback = (lambda piece, i=i: on_text(i, piece)) if on_text else None
                    rows.append(self.make_row(self.encode(texts[i], names[i], chat=chat), names[i],
                                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                              seed=seed, stop=stop, ignore_eos=ignore_eos, on_text=callback))
                self.run(rows)
                results += [self._result(r) for r in rows]
        return results[0] if single else results

    def _result(self, row: Row) -> Generation:
        ref = self._attached[row.key].info.ref if row.key is not None and row.key in self._attached else None
        return Generation(row.text, list(row.tokens), row.finish_reason or FINISH_LENGTH, len(row.prompt), ref)

    def stream(self, prompt: str, *, adapter: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated (see :meth:`generate`)."""
        import queue

        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.generate(prompt, adapter=adapter, on_text=lambda _, piece: pieces.put(piece), **kwargs)
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
            finally:
                pieces.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (piece := pieces.get()) is not done:
            yield piece
        thread.join()
        if failure:
            raise failure[0]

    def logits(self, prompts: Sequence[str | Sequence[int]], *, adapters: Sequence[str | None] | None = None,
               adapter: str | None = None) -> list[torch.Tensor]:
        """Per-row logits of every prompt position in the row's own (local) vocabulary, as one mixed batch.

        Returns:
            For each prompt a float tensor ``[prompt tokens, vocabulary of its adapter]``.
        """
        names = list(adapters) if adapters is not None else [adapter] * len(prompts)
        with self._lock:
            keys = [self.key_of(n) for n in names]
            ids = [self.encode(p, n) for p, n in zip(prompts, names)]
            self._install()
            return forward_rows(self.model, self._table, self._lora, ids, keys, self._pad_id,
                                self._originals[1].out_features)


def load_base(base: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, registry: Any = None, adapters: Sequence[str] = ()) -> RuntimeBase:
    """Load a base model for serving domain adapters.

    Args:
        base: preset name, local model directory or hub id (default: the default preset).
        device, dtype: as :func:`dsft.base.load_base` (CUDA + bf16 when available, else CPU + fp32).
        registry: a SQLAlchemy URL or an open :class:`dsft.registry.Registry` (default: ``$DSFT_REGISTRY_URL``
            or ``$DSFT_HOME/registry.db``), consulted on every attach.
        adapters: refs to attach right away.
    Raises:
        NotFoundError, UnsupportedModelError, UsageError (loading); what :meth:`RuntimeBase.attach` raises.
    """
    from dsft.base import DEFAULT_BASE
    from dsft.base import load_base as load_plain

    runtime = RuntimeBase(load_plain(base or DEFAULT_BASE, device=device, dtype=dtype, trust_remote_code=trust_remote_code),
                          registry=registry)
    for ref in adapters:
        runtime.attach(ref)
    return runtime
