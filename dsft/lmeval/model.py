"""The ``dsft`` model of EleutherAI's lm-evaluation-harness: a dsft base, alone or with a registered adapter.

    python -m dsft.lmeval run --model dsft --model_args base=tiny-deepseek-v2,adapter=finance@0.1.0 --tasks hellaswag

Importing this module registers the model as ``dsft`` (lm-eval discovers no plugins on its own, so the
import is what ``python -m dsft.lmeval`` and :mod:`dsft.lmeval.run` do first).

Requests are scored through :class:`dsft.runtime.RuntimeBase`: the adapter is attached the way ``dsft
serve`` attaches it (registry compatibility with this base's fingerprint, files against their sha256) and
every row is encoded with its adapter's own tokenizer (the base's plus the adapter's terms), so what lm-eval
measures is what the runtime serves. One loaded base can back several of these models (base alone and
base + adapter) with ``runtime=``: the base is read once.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsft.errors import UsageError

log = logging.getLogger("dsft.eval")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value: Any) -> int:
    """lm-eval passes ``--batch_size`` through as given: ``8``, ``"8"``, ``"auto"`` or ``"auto:4"``."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE  # no memory probing here: rows are short next to what the runtime batches
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {size}")
    return size


@register_model("dsft")
class DsftLM(LM):
    """A dsft base (and optionally one adapter) as an lm-eval ``LM``.

    Args:
        base: preset name, local model directory or hub id (default: the adapter's own base, else the default preset).
        adapter: registered adapter ref (``finance``, ``finance@0.1.0``, ``finance@production``); none = the base alone.
        registry: registry SQLAlchemy URL (default: ``$DSFT_REGISTRY_URL`` or ``$DSFT_HOME/registry.db``).
        device: ``cpu``, ``cuda``, ``cuda:1``; default as dsft loads bases (CUDA when available).
        batch_size: rows per forward.
        max_length: context in tokens (default: the model's ``max_position_embeddings``).
        runtime: an already loaded :class:`~dsft.runtime.RuntimeBase` to use instead of loading ``base``
            (Python API only); ``adapter`` is attached to it if it is not already.
    Raises:
        NotFoundError, IntegrityError, IncompatibleError: the adapter cannot be attached (as ``dsft serve``).
    """

    def __init__(self, base: str | None = None, adapter: str | None = None, registry: str | None = None,
                 device: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, runtime: Any = None,
                 **unused: Any) -> None:
        super().__init__()
        # lm-eval hands every model max_batch_size, trust_remote_code and the like; dsft has no use for them.
        del unused
        if runtime is None:
            from dsft.runtime import load_base

            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line says cuda:0 unless told otherwise; its HFLM falls back to CPU too.
                log.warning("device %s asked for but CUDA is not available; using the CPU", device)
                device = "cpu"

            runtime = load_base(base or _adapter_base(adapter, registry), device=device, registry=registry)
        self.runtime = runtime
        self.adapter: str | None = None
        if adapter:
            self.adapter = runtime.attach(adapter).ref if adapter != runtime.name else None
        self.tokenizer = runtime.tokenizer_for(self.adapter)
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.max_length = int(max_length) if max_length else runtime.max_context
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DsftLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DsftLM:
        # lm-eval adds its own --device/--batch_size (device defaulting to cuda:0) beside --model_args:
        # what model_args says wins, instead of the duplicate keyword lm-eval's base class would pass.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # --- what lm-eval asks of every model -----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.runtime.model.device

    @property
    def tokenizer_name(self) -> str:
        # Part of lm-eval's request-cache key: base and base + adapter must not share cached answers.
        return f"{self.runtime.name}+{self.adapter}" if self.adapter else self.runtime.name

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after (as lm-eval's HFLM): BOS, else EOS."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as HFLM splits them: trailing spaces of the context go with the
        continuation, and the continuation is the whole text's tail (encoded in one piece, as it is read).

        An adapter's multi-word term can span the seam (context "... reduced duration", continuation
        " risk" is one token ``duration risk``): the whole's ids then do not start with the context's, and
        the continuation is encoded on its own, so that only its own text is scored, on base and adapter alike.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if len(whole) > len(ctx) and whole[:len(ctx)] == ctx:
            return ctx, whole[len(ctx):]
        return ctx, self._encode(continuation)

    # --- scoring -------------------------------------------------------------------------------------

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation after its context and whether greedy decoding gives it,
        in batches of rows of similar length (longest first, so memory trouble shows on the first batch)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for lo in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[lo:lo + self.batch_size_per_gpu]
            inputs, conts = [], []
            for i in chunk:
                ctx, cont = pairs[i]
                # The last continuation token is predicted, never fed; the context is cut from the left
                # (and a continuation longer than the context window is scored on its last window, as HFLM).
                inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont[-self.max_length:])
            logits = self.runtime.logits(inputs, adapter=self.adapter)
            for i, row, cont in zip(chunk, logits, conts):
                if not cont:  # nothing to predict: certain, and trivially greedy
                    out[i] = (0.0, True)
                    continue
                logp = row[-len(cont):].log_softmax(-1)
                target = torch.tensor(cont, device=logp.device)
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*req.args) for req in requests]
        results = self._score(pairs)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        # Each text in windows of the context length, every token scored once (lm-eval's own windowing).
        windows, owner = [], []
        for n, req in enumerate(requests):
            for w in get_rolling_token_windows(self._encode(req.args[0]), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation settings (a task's) are generated together, a batch at a time.
        groups: dict[tuple, list[int]] = {}
        for n, req in enumerate(requests):
            until, max_new, temperature = self._settings(dict(req.args[1] or {}))
            groups.setdefault((tuple(until), max_new, temperature), []).append(n)
        out: list[str] = [""] * len(requests)
        for (until, max_new, temperature), members in groups.items():
            for lo in range(0, len(members), self.batch_size_per_gpu):
                chunk = members[lo:lo + self.batch_size_per_gpu]
                # Keep each prompt's tail that leaves room for the answer (the runtime refuses an overlong prompt).
                prompts = [self._encode(requests[n].args[0])[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
                           for n in chunk]
                gens = self.runtime.generate(prompts, adapter=self.adapter, raw=True, max_new_tokens=max_new,
                                             temperature=temperature, stop=list(until))
                for n, gen in zip(chunk, gens):
                    out[n] = _cut(gen.text, until)
                    self.cache_hook.add_partial("generate_until", requests[n].args, out[n])
        return out

    def _settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        """(stop strings, new tokens at most, temperature) from a request's lm-eval generation kwargs."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
        return until, max_new, temperature


def _cut(text: str, until: Iterable[str]) -> str:
    """The text before the first stop string (the runtime stops on them; this also trims a partial tail)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _adapter_base(adapter: str | None, registry: str | None) -> str | None:
    """The base an adapter records it was trained on, so ``model_args=adapter=finance@0.1.0`` is enough."""
    if not adapter:
        return None
    from dsft.registry import open_registry

    with open_registry(registry) as reg:
        manifest = reg.resolve(adapter).parsed_manifest()
    return manifest.base.name if manifest.base is not None else None
