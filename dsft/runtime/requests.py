"""The request side of :class:`dsft.runtime.base.RuntimeBase`: encode a prompt, make a row, generate it.

    ids = base.encode("What is duration risk?", "finance")              # the adapter's tokenizer, chat format
    row = base.make_row(ids, base.resolve("finance"), max_new_tokens=32)
    base.run([row]); base.result(row).text                              # what generate() does, a batch at a time
    batch = base.batch(); base.step(batch, [row]); base.step(batch)     # what the engine does, a token at a time

:class:`RuntimeRequests` is a mixin: :mod:`dsft.runtime.base` keeps what is attached and changes it
(attach, detach, close); this half reads it. The two meet at the runtime's lock, which a request holds
for one step at a time (:meth:`RuntimeRequests.step`), so an attach or detach waits for a token, never for
a whole generation.

:meth:`RuntimeRequests.run` (what :meth:`generate` calls) keeps one idle batch between calls: on a GPU a
batch's :class:`dsft.runtime.static_cache.SlotDecoder` captures a CUDA graph per (rows, width) bucket and
allocates the KV slots, which a new batch per call would redo every time (0.1-0.2 s a call on an H200, for
a request decoding at ~8 ms a token). A batch stays correct across attach and detach (its graphs are dropped
and captured again when :attr:`dsft.runtime.multilora.MultiLora.version` moves, its layouts when the term
ranges do), but the idle one is dropped by a detach (its graphs hold the stacked factors they read, which
would keep a detached adapter's memory; a run during which adapters changed is not kept either) and by
close (its tables are torn down; a batch still running then fails its rows: :meth:`RuntimeRequests.step`).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from dsft.errors import NotFoundError, UsageError
from dsft.runtime.batching import RunningBatch
from dsft.runtime.generation import FINISH_LENGTH, Row, check_sampling, fail, forward_rows
from dsft.runtime.records import ContextLengthError, Generation, RuntimeClosedError
from dsft.runtime.refs import AdapterHandle

if TYPE_CHECKING:
    from dsft.adapters.terms import TermTable
    from dsft.runtime.multilora import MultiLora


class RuntimeRequests:
    """Encoding, rows, batches and generation on the adapters a :class:`dsft.runtime.base.RuntimeBase` has
    attached. Not used on its own: ``RuntimeBase`` provides the model, the lock and the attached adapters."""

    if TYPE_CHECKING:  # what RuntimeBase provides
        model: Any
        tokenizer: Any
        batch_size: int
        _lock: threading.RLock
        _priority: int
        _attached: Mapping[str, Any]
        _table: TermTable | None
        _lora: MultiLora | None
        _originals: tuple[Any, Any] | None
        _idle_batch: RunningBatch | None
        _idle_key: tuple[str, str] | None

        def resolve(self, adapter: str | AdapterHandle | None) -> AdapterHandle | None: ...
        def tokenizer_for(self, adapter: str | AdapterHandle | None) -> Any: ...
        def _entry(self, handle: AdapterHandle) -> Any: ...
        def _install(self) -> None: ...
        def _exclusive(self) -> AbstractContextManager[None]: ...

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

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, prompt: str | Sequence[int], adapter: str | AdapterHandle | None = None, *,
               raw: bool = False) -> list[int]:
        """Token ids of ``prompt`` as a request routed to ``adapter`` sees them (local ids).

        Args:
            prompt: text, or token ids (used as they are).
            raw: encode the text as it is (to be continued); by default it is a user's instruction, wrapped
                in the chat format the adapters were trained on (:func:`dsft.runtime.chat.encode_messages`).
        """
        if not isinstance(prompt, str):
            return list(prompt)
        if not raw:
            return self.encode_messages([{"role": "user", "content": prompt}], adapter)
        return list(self.tokenizer_for(adapter)(prompt, add_special_tokens=True)["input_ids"])

    def encode_messages(self, messages: Sequence[Mapping], adapter: str | AdapterHandle | None = None) -> list[int]:
        """Prompt ids of a conversation whose next turn is the assistant's, for ``adapter``'s tokenizer."""
        from dsft.runtime.chat import encode_messages

        return encode_messages(self.tokenizer_for(adapter), messages)

    def make_row(self, prompt_ids: list[int], adapter: str | AdapterHandle | None, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 ignore_eos: bool = False, on_text: Callable[[str], bool | None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Row:
        """A row for :meth:`run`; ``prompt_ids`` are in ``adapter``'s tokenizer's ids.

        Raises:
            UsageError: limits or sampling out of range (:func:`dsft.runtime.generation.check_sampling`), an
                empty prompt. ContextLengthError: the prompt and ``max_new_tokens`` exceed the context.
            NotFoundError: the adapter is not attached.
        """
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {self.max_context} tokens; shorten the prompt or ask for fewer tokens")
        handle = self.resolve(adapter)
        tok = self.tokenizer if handle is None else self._entry(handle).tokenizer
        return Row(list(prompt_ids), None if handle is None else handle.key, tok, max_new_tokens, temperature, top_p,
                   seed, tuple(stop), self.eos_ids, ignore_eos, on_text, cancelled)

    def run(self, rows: list[Row]) -> None:
        """Generate a batch of prepared rows together, a :meth:`step` at a time: the lock is held for one
        token, so adapters can be attached and detached while the rows generate. A row whose adapter was
        detached before it started or while it generated, or that fails on its own (see :attr:`Row.error`),
        ends with ``finish_reason == "error"``; the others complete.

        The batch is the runtime's idle one when no other ``run`` holds it (its CUDA graphs and KV slots
        are reused: see the module's docstring), else a new one; it is kept for the next call only if it
        ends empty and healthy.

        Raises:
            Exception: only what fails the whole batch (e.g. out of memory).
        """
        if not rows:
            return
        key = _batch_defaults()
        batch = self._take_batch(key)
        version = batch.lora.version
        self.step(batch, rows)
        while len(batch):
            self.step(batch)
        # Not reached when a step raised: such a batch is unusable (RunningBatch.step) and is dropped.
        self._give_back(batch, key, version)

    def _take_batch(self, key: tuple[str, str]) -> RunningBatch:
        """The idle batch if it was made with the defaults ``key`` (else a new one): taken out of the slot, so
        a concurrent :meth:`run` gets a batch of its own. With priority over the steps of running generations
        (the lock is not fair: a caller that only waited for it could wait out a whole generation of another
        thread's, which takes it back after every step)."""
        with self._exclusive():
            batch, self._idle_batch = self._idle_batch, None
            if batch is not None and self._idle_key == key and self._current(batch):
                return batch
            return self.batch()

    def _give_back(self, batch: RunningBatch, key: tuple[str, str], version: int) -> None:
        """Keep ``batch`` as the idle one, if it is empty and still runs on the runtime's tables, and no adapter was
        attached or detached while it ran (``version``: a detach after its last forward would leave its graphs
        holding the detached adapter's factors). Under the lock, so that a close or detach (which drop the idle
        batch under it) cannot pass between check and keep."""
        with self._lock:
            if len(batch) or not self._current(batch) or batch.lora.version != version:
                return
            batch.abandon()  # an empty batch's leftovers (tokens of evicted rows still in flight): none kept
            self._idle_batch, self._idle_key = batch, key

    def _current(self, batch: RunningBatch) -> bool:
        """Whether ``batch`` decodes through the runtime's tables now: not after :meth:`close` tore them down
        (``_lora`` None), nor after a later request installed new ones (another ``_lora``)."""
        return self._lora is not None and batch.lora is self._lora and batch.table is self._table

    def batch(self, *, prefill_chunk: int | None = None, graphs: bool | None = None,
              buckets: bool | None = None, overlap: bool | None = None,
              prefill_graphs: bool | str | None = None) -> RunningBatch:
        """An empty running batch on this runtime, for :meth:`step` (what the engine decodes with); prompts longer
        than ``prefill_chunk`` tokens are prefilled a chunk per step. Decode steps replay CUDA graphs on a GPU
        (``graphs``; see :class:`dsft.runtime.static_cache.SlotDecoder` for ``buckets``), each launched before the
        previous one's tokens are read (``overlap``), whole prompts prefilled through ``prefill_graphs``
        (:class:`dsft.runtime.batching.RunningBatch`)."""
        with self._lock:
            self._install()
            return RunningBatch(self.model, self._table, self._lora, self._pad_id, self._originals[1].out_features,
                                prefill_chunk=prefill_chunk, graphs=graphs, buckets=buckets, overlap=overlap,
                                prefill_graphs=prefill_graphs)

    def kv_bytes(self, batch: RunningBatch, lengths: Sequence[int]) -> int | None:
        """:meth:`RunningBatch.kv_bytes_for` under the runtime's lock (its first call runs the model)."""
        with self._lock:
            return batch.kv_bytes_for(lengths)

    def step(self, batch: RunningBatch, new_rows: Sequence[Row] = ()) -> list[Row]:
        """One token boundary of continuous batching, under the runtime's lock (attach and detach happen
        between steps, never under one): running rows whose adapter was detached since the last step fail
        alone and leave; ``new_rows`` join (each gets its first token; one whose adapter is gone fails
        alone); then every running row decodes one token.

        A batch made before :meth:`close` (which ran between two steps) does not decode any more: its
        multi-adapter tables are torn down, so every row, new ones included, fails alone with
        :class:`RuntimeClosedError` and leaves.

        Returns:
            The rows that finished or failed during this step (they have left ``batch``).
        Raises:
            Exception: only what fails the whole step (e.g. out of memory); ``batch`` is then unusable.
        """
        while self._priority:  # an attach or detach is waiting for the lock: let it go first
            time.sleep(0.0005)
        with self._lock:
            if not self._current(batch):
                return self._fail_closed(batch, new_rows)
            gone = batch.evict(lambda row: NotFoundError(
                f"adapter {row.key} was detached while this request was generating ({len(row.tokens)} tokens "
                f"in); the request was stopped") if row.key is not None and row.key not in self._attached else None)
            ok = []
            for row in new_rows:
                if row.key is not None and row.key not in self._attached:
                    fail(row, NotFoundError(f"adapter {row.key} was detached before its request ran"))
                    gone.append(row)
                else:
                    ok.append(row)
            if ok:
                gone += batch.admit(ok)
            gone += batch.step()
        return gone

    @staticmethod
    def _fail_closed(batch: RunningBatch, new_rows: Sequence[Row]) -> list[Row]:
        """Every row of ``batch`` and ``new_rows`` failed with :class:`RuntimeClosedError` (a batch of a closed runtime)."""
        def closed(row: Row) -> RuntimeClosedError:
            return RuntimeClosedError(f"the runtime was closed while this request was generating ({len(row.tokens)} "
                                      f"tokens in); the request was stopped")
        gone = batch.evict(closed)
        for row in new_rows:
            fail(row, closed(row))
            gone.append(row)
        return gone

    def result(self, row: Row) -> Generation:
        """What a finished row generated.

        Raises:
            Exception: the row's own failure (:attr:`Row.error`).
        """
        if row.error is not None:
            raise row.error
        return Generation(row.text, list(row.tokens), row.finish_reason or FINISH_LENGTH, len(row.prompt), row.key)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        adapter: str | None = None,
        adapters: Sequence[str | None] | None = None,
        raw: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[int, str], None] | None = None,
    ) -> Generation | list[Generation]:
        """Answer one prompt or a batch (as ``dsft generate`` and the server do).

        Args:
            prompts: a prompt, or a list of prompts (one batch).
            adapter: the adapter for every row (domain or ref; None = the plain base).
            adapters: one adapter per row instead (None entries = the plain base): a mixed batch in
                which each row gets exactly what it would get with only its adapter attached.
            raw: continue each prompt as plain text; by default a prompt is an instruction, wrapped as a user
                turn in the format the adapters were trained on (``dsft generate --raw``, ``"raw": true``
                on the server).
            max_new_tokens, temperature, top_p, seed, stop: per-row limits and sampling (temperature 0 = greedy).
            ignore_eos: keep going past the end-of-sequence token (benchmarks).
            on_text: called as ``on_text(row, piece)`` while text is generated (streaming).
        Returns:
            A :class:`Generation` for a single prompt, else a list in prompt order.
        Raises:
            NotFoundError: an adapter that is not attached. UsageError: bad limits or a prompt too long.
            Exception: a row that failed on its own (the first one).
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if adapters is not None and adapter is not None:
            raise UsageError("give either adapter= (one for all rows) or adapters= (one per row), not both")
        names = list(adapters) if adapters is not None else [adapter] * len(texts)
        if len(names) != len(texts):
            raise UsageError(f"adapters= has {len(names)} entries for {len(texts)} prompts")
        handles = [self.resolve(n) for n in names]
        results: list[Generation] = []
        for lo in range(0, len(texts), self.batch_size):
            rows = []
            for i in range(lo, min(lo + self.batch_size, len(texts))):
                callback = (lambda piece, i=i: on_text(i, piece)) if on_text else None
                rows.append(self.make_row(self.encode(texts[i], handles[i], raw=raw), handles[i],
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=seed, stop=stop, ignore_eos=ignore_eos, on_text=callback))
            self.run(rows)
            results += [self.result(r) for r in rows]
        return results[0] if single else results

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
        """Per-row logits of every position of each prompt, taken as raw text, in the row's own (local)
        vocabulary, as one mixed batch.

        Returns:
            For each prompt a float tensor ``[prompt tokens, vocabulary of its adapter]``.
        """
        names = list(adapters) if adapters is not None else [adapter] * len(prompts)
        handles = [self.resolve(n) for n in names]
        ids = [self.encode(p, h, raw=True) for p, h in zip(prompts, handles)]
        with self._lock:
            for h in handles:
                if h is not None:
                    self._entry(h)
            self._install()
            return forward_rows(self.model, self._table, self._lora, ids, [h and h.key for h in handles],
                                self._pad_id, self._originals[1].out_features)


def _batch_defaults() -> tuple[str, str]:
    """What a :class:`RunningBatch` made with default arguments reads from the environment (CUDA graphs, overlap):
    an idle batch made under other settings is not reused (a benchmark sets ``DSFT_CUDA_GRAPHS=0`` between two
    :meth:`RuntimeRequests.generate` calls to compare against eager steps)."""
    return os.environ.get("DSFT_CUDA_GRAPHS", "1"), os.environ.get("DSFT_OVERLAP", "1")
