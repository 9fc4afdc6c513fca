"""``dsft serve``: load a base, attach adapters, start the engine and serve HTTP with uvicorn."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from dsft.errors import UsageError
from dsft.runtime.records import AdapterInfo
from dsft.serve.app import Limits, create_app
from dsft.serve.guard import LOOPBACK, allowed_hosts, check_bind


def serve(
    base: str,
    adapters: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str | None = None,
    registry: str | None = None,
    max_batch_size: int = 32,
    batch_wait_ms: float = 10.0,
    max_queue: int = 1024,
    kv_memory_gib: float | None = None,
    max_adapters: int | None = None,
    adapter_memory_gib: float | None = None,
    load_on_demand: bool = False,
    access_log: str | None = "-",
    limits: Limits = Limits(),
    trust_remote_code: bool = False,
    fp8_experts: bool = False,
    ui: bool = False,
    warm_up: bool | None = None,
    on_ready: Callable[[str, list[AdapterInfo]], None] | None = None,
) -> None:
    """Serve ``base`` with ``adapters`` attached until interrupted.

    Args:
        adapters: refs to attach (a bare domain takes its ``production`` tag, else its newest version).
        host, port: where to listen; 127.0.0.1 unless told otherwise.
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <key>``; when not,
            requests must name this address as their Host and come from no other origin.
        max_batch_size, batch_wait_ms: continuous batching: the most requests generating at once, and how
            long a request that finds none running waits for others at most (it stops once none arrived for
            2 ms: :data:`dsft.runtime.engine.QUIET_S`).
        max_queue: completions waiting beyond this are answered 429 with ``Retry-After``.
        kv_memory_gib: the most GiB the running requests' KV cache may take (default: on a GPU, half of what
            is free once the base and adapters are loaded); a request beyond it waits, one that alone needs
            more is refused.
        max_adapters, adapter_memory_gib: the residency budget (None: no limit); attaching beyond it evicts
            the least recently used adapter that no request is using.
        load_on_demand: a request naming a registry adapter that is not resident attaches it first.
        access_log: where the JSON access-log lines go: ``-`` (stderr), a file (appended), or None / ``off``.
        ui: also serve the registry pages under ``/ui`` (read from the registry adapters are resolved in).
        warm_up: run :func:`warm_engine` before listening (default: on a GPU, where the first decode steps compile
            kernels and capture CUDA graphs).
        on_ready: called with the base URL and the attached adapters once they are loaded, before listening.
    Raises:
        UsageError: bad port, batching, queue or budget settings or --max-tokens; what loading and attaching raise.
    """
    import uvicorn

    from dsft.runtime.base import load_base
    from dsft.runtime.engine import Engine
    from dsft.serve import access
    from dsft.serve.residency import Budget, Residency

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535, got {port}")
    if max_batch_size < 1 or batch_wait_ms < 0:
        raise UsageError("--max-batch-size must be >= 1 and --batch-wait-ms >= 0")
    if max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {max_queue}")
    if kv_memory_gib is not None and not kv_memory_gib > 0:
        raise UsageError(f"--kv-memory must be > 0 GiB, got {kv_memory_gib}")
    if max_adapters is not None and max_adapters < 1:
        raise UsageError(f"--max-adapters must be >= 1, got {max_adapters}")
    if max_adapters is not None and len(adapters) > max_adapters:
        raise UsageError(f"{len(adapters)} --adapter given but --max-adapters is {max_adapters}")
    if adapter_memory_gib is not None and not adapter_memory_gib > 0:
        raise UsageError(f"--adapter-memory must be > 0 GiB, got {adapter_memory_gib}")
    budget = Budget(max_adapters, None if adapter_memory_gib is None else int(adapter_memory_gib * 2**30))
    check_bind(host, api_key)
    if limits.max_tokens < 1:  # else the server would start and refuse every request
        raise UsageError(f"--max-tokens must be >= 1, got {limits.max_tokens}")
    ui_registry = None
    if ui:  # opened before the model loads: a registry that cannot be read fails in a second, not a minute
        from dsft.registry import open_registry

        ui_registry = open_registry(registry)
    try:
        handler = access.configure(access_log)
    except OSError as exc:
        raise UsageError(f"--access-log {access_log}: {exc.strerror or exc}") from None
    runtime = load_base(base, device=device, registry=registry, trust_remote_code=trust_remote_code, fp8_experts=fp8_experts)
    residency = Residency(runtime, budget, load_on_demand=load_on_demand)
    infos = [residency.attach(ref)[0] for ref in adapters]
    engine = Engine(runtime, max_batch_size=max_batch_size, max_wait_s=batch_wait_ms / 1000, max_queue=max_queue,
                    kv_memory_gib=kv_memory_gib)
    if warm_up is None:
        warm_up = runtime.model.device.type == "cuda"
    if warm_up:
        try:
            seconds = warm_engine(engine, [i.ref for i in infos])
        except BaseException:  # not serving: give the engine's thread and the model back before saying why
            engine.close()
            runtime.close()
            raise
        logging.getLogger("dsft.serve").info("warmed up in %.1f s", seconds)
    app = create_app(runtime, engine, api_key=api_key, limits=limits, hosts=allowed_hosts(host, port),
                     ui_registry=ui_registry, residency=residency)
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}", infos)
    if host not in LOOPBACK and not api_key:
        logging.getLogger("dsft.serve").warning("listening on %s without an API key: anyone who can reach it can use it", host)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        engine.close()
        runtime.close()
        if ui_registry is not None:
            ui_registry.close()
        if handler is not None:
            logging.getLogger(access.ACCESS_LOGGER).removeHandler(handler)
            handler.close()


def warm_engine(engine, refs: Sequence[str]) -> float:
    """Two greedy tokens for the plain base and each of ``refs``, in one batch, before the first client comes: on a
    GPU the first decode steps compile the experts' Triton kernel (:mod:`dsft.kernels.moe_gemm`; cached on disk
    afterwards) and capture CUDA graphs, seconds a first user would otherwise wait. The engine's counts are reset
    after, so ``/health`` shows clients' requests only. Returns the seconds it took.

    Raises:
        Exception: what the first failed warm-up request failed with (a server that cannot generate should not
        start listening).
    """
    from dsft.runtime.engine import Request

    t0 = time.perf_counter()
    answers: list[Future] = []
    for ref in [None, *refs]:
        answer: Future = Future()
        engine.submit(Request(adapter=ref, prompt="warm up", raw=True, max_new_tokens=2, ignore_eos=True),
                      lambda kind, payload, answer=answer: kind in ("done", "error") and answer.set_result((kind, payload)))
        answers.append(answer)
    for answer in answers:
        kind, payload = answer.result()
        if kind == "error":
            raise payload
    engine.reset_counts()
    return time.perf_counter() - t0
