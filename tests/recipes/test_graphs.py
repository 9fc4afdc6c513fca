"""CUDA graphs for the training loop's micro-batches (:mod:`dsft.recipes.graphs`). Capturing needs a GPU; here a
stand-in records the step function the way a graph does (nothing runs at capture, each replay runs the recorded
work again into the same input and output tensors), so the bookkeeping around it - warm-up, shapes, inputs copied
in, gradients added into tensors that exist before capture, fallback - is checked against the plain loop. The real
graphs are checked against eager steps on a GPU (``benchmarks/train_graph_check.py``) and measured there
(``benchmarks/train_throughput.py --graphs``)."""
from __future__ import annotations

import copy

import pytest
import torch

from dsft.base.arch import spec_for
from dsft.base.router import RouterProbe
from dsft.kernels import chunked_ce
from dsft.recipes.graphs import StepGraphs, graphs_off_reason, recorded_alike
from dsft.recipes.loop import train_steps

STEPS = 6


def recorded(params: list[torch.Tensor]):
    """A capture that behaves like a CUDA graph on the CPU: the work ``run`` does at capture time leaves no trace
    on the gradients (a graph records, it does not run), and ``replay`` runs it again, writing into the outputs
    captured the first time (a graph's static outputs). A gradient that existed at capture is added into at each
    replay; one the recording made is overwritten at each replay, whatever ``.grad`` holds then."""
    captures = []

    def capture(run):
        before = [None if p.grad is None else p.grad.clone() for p in params]
        outputs = run()
        targets = [p.grad for p in params]
        made = [b is None and t is not None for b, t in zip(before, targets)]
        for p, g in zip(params, before):
            if g is not None:
                p.grad.copy_(g)
        captures.append(outputs)

        def replay():
            held = [p.grad for p in params]
            for p, t, m in zip(params, targets, made):
                p.grad = None if m else t
            fresh_outputs = run()
            for p, t, m in zip(params, targets, made):
                if m and p.grad is not None:
                    t.copy_(p.grad)
            for p, h in zip(params, held):
                p.grad = h
            for out, fresh in zip(outputs, fresh_outputs):
                if out is not None:
                    out.copy_(fresh)
        return replay, outputs

    capture.captures = captures
    return capture


def _batches(vocab: int, rows: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (STEPS, rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 1, 12:] = 0
    return lambda step: {"input_ids": ids[step], "attention_mask": mask[step], "labels": ids[step].masked_fill(mask[step] == 0, -100)}


def _train(model, start, batches=None, steps=STEPS, **kwargs):
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    infos = []
    probe = RouterProbe(model, spec_for(model.config.model_type))
    try:
        losses = train_steps(model, optimizer, batches or _batches(model.config.vocab_size), steps=steps, peak_lrs=[1e-3],
                             warmup=2, schedule="cosine", grad_clip=1.0, probe=probe, on_step=infos.append, **kwargs)
    finally:
        probe.close()
    return losses, [(i.loss, i.aux_loss, i.grad_norm, i.imbalance) for i in infos], copy.deepcopy(model.state_dict())


def _close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol * max(1.0, abs(x)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_replayed_steps_train_as_the_plain_loop_does(tiny_qwen2_moe, micro_batch):
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    plain = _train(model, start, micro_batch=micro_batch)
    capture = recorded(list(model.parameters()))
    graphs = StepGraphs(capture=capture)
    replayed = _train(model, start, micro_batch=micro_batch, graphs=graphs)

    # Micro-batches of 2 rows: one shape, replayed with each part's own weight. Only the first part of a step has
    # padding (a mask built eagerly as under capture), so only it counts as a warm-up: step 0 and 1's first parts
    # warm up, step 0's second part runs eagerly, step 1's is captured.
    eager = 3 if micro_batch else 2
    assert graphs.summary() == {"shapes": 1, "replays": STEPS * (2 if micro_batch else 1) - eager, "off": None}
    assert len(capture.captures) == 1
    assert _close(plain[0], replayed[0]) and len(plain[0]) == STEPS
    assert all(_close(a, b) for a, b in zip(plain[1], replayed[1]))  # loss, aux loss, grad norm, router imbalance
    assert all(torch.allclose(plain[2][k], replayed[2][k], atol=1e-6) for k in start)
    assert all(p.grad is None for p in model.parameters())  # the gradients kept for the graphs go with the loop
    graphs.close()
    assert graphs.summary()["shapes"] == 1  # what ran, after the graphs went


def test_each_shape_warms_up_then_is_captured_up_to_the_limit(tiny_qwen2_moe):
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    wide, narrow = _batches(model.config.vocab_size, seq=16), _batches(model.config.vocab_size, seq=12)
    alternating = lambda step: wide(step) if step % 2 == 0 else narrow(step)  # noqa: E731
    plain = _train(model, start, batches=alternating)
    graphs = StepGraphs(capture=recorded(list(model.parameters())), max_shapes=1)
    replayed = _train(model, start, batches=alternating, graphs=graphs)

    # the wide rows (steps 0, 2, 4): two warm-ups, then captured; the narrow ones run eagerly past the limit
    assert graphs.summary() == {"shapes": 1, "replays": 1, "off": None}
    assert _close(plain[0], replayed[0])


def test_the_first_graph_writes_the_gradients_and_the_others_add_into_them(tiny_qwen2_moe):
    """Three rows in micro-batches of 2 and 1: two shapes a step. The one-row shape is captured first: it records
    with no gradient alive (its backward makes them, so they take no memory through its forward, where a step
    peaks) and runs after the step's other micro-batch, whose gradient it keeps; the two-row shape, captured later
    (its first batches do not count as warm-ups here), adds into the same tensors. Both train as the plain loop."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    three = _batches(model.config.vocab_size, rows=3)
    batches = lambda step: three(step % STEPS)  # noqa: E731
    plain = _train(model, start, batches=batches, steps=10, micro_batch=2)
    params = list(model.parameters())
    inner, alive_at_capture, two_row_calls, alive_at_step_start = recorded(params), [], [], []

    def capture(run):
        alive_at_capture.append(sum(p.grad is not None for p in params))
        return inner(run)

    def alike(part):
        if part["input_ids"].shape[0] == 2:  # each step's first micro-batch
            two_row_calls.append(1)
            alive_at_step_start.append(sum(p.grad is not None for p in params))
            return len(two_row_calls) > 3
        return True

    graphs = StepGraphs(capture=capture, alike=alike)
    replayed = _train(model, start, batches=batches, steps=10, micro_batch=2, graphs=graphs)
    # one row: warm-ups at steps 0-1, captured at 2, replayed to 9; two rows: eager to 4, captured at 5
    assert graphs.summary() == {"shapes": 2, "replays": 8 + 5, "off": None}
    assert alive_at_capture[0] == 0 and alive_at_capture[1] == sum(p.requires_grad for p in params)
    # before the writing graph exists, a step starts with no gradient alive (the last step's were zero): as eagerly
    assert alive_at_step_start[:3] == [0, 0, 0] and alive_at_step_start[3] > 0
    assert _close(plain[0], replayed[0])
    assert all(_close(a, b) for a, b in zip(plain[1], replayed[1]))
    assert all(torch.allclose(plain[2][k], replayed[2][k], atol=1e-6) for k in start)


def test_a_capture_that_fails_leaves_the_step_to_eager_code(tiny_qwen2_moe):
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    plain = _train(model, start)

    def refuses(run):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    graphs = StepGraphs(capture=refuses)
    with pytest.warns(UserWarning, match="CUDA graphs off for this stage, steps run eagerly: capture failed "
                                         r"\(RuntimeError: CUDA error: operation not permitted when stream is capturing\)"):
        replayed = _train(model, start, graphs=graphs)
    assert graphs.summary()["off"].startswith("capture failed") and graphs.summary()["replays"] == 0
    assert _close(plain[0], replayed[0])
    told = []  # dsft train tells it as one line of its output (the run's warning event)
    _train(model, start, graphs=StepGraphs(capture=refuses, on_warning=told.append))
    assert len(told) == 1 and told[0].endswith("(DSFT_CUDA_GRAPHS=0 skips the attempt)")


def test_unfreezing_mid_loop_records_the_graphs_again(tiny_qwen2_moe):
    """Progressive unfreezing: the first three steps train the top layer only, then both. A graph recorded the old
    set's backward, so each change of what trains drops the graphs and warms up again; a tensor that stops training
    loses its gradient (a kept zero one would still move it through AdamW's momentum and decay)."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    top = [p for n, p in model.named_parameters() if "layers.1." in n]

    def unfreeze(step):
        for n, p in model.named_parameters():
            p.requires_grad_(step >= 3 or "layers.1." in n)

    plain = _train(model, start, before_step=unfreeze)
    capture = recorded(list(model.parameters()))
    graphs = StepGraphs(capture=capture)
    replayed = _train(model, start, before_step=unfreeze, graphs=graphs)
    # steps 0-1 warm up, 2 is captured, 3 changes what trains: 3-4 warm up again, 5 is captured
    assert graphs.summary() == {"shapes": 2, "replays": 2, "off": None} and len(capture.captures) == 2
    assert _close(plain[0], replayed[0])
    assert all(torch.allclose(plain[2][k], replayed[2][k], atol=1e-6) for k in start)
    assert top and all(p.requires_grad for p in top)

    def freeze_at_3(step):
        for n, p in model.named_parameters():
            p.requires_grad_(step < 3 or "layers.1." in n)

    plain = _train(model, start, before_step=freeze_at_3)
    replayed = _train(model, start, before_step=freeze_at_3, graphs=StepGraphs(capture=recorded(list(model.parameters()))))
    frozen = [k for k in start if "layers.1." not in k and "layers." in k]
    assert frozen and all(torch.allclose(plain[2][k], replayed[2][k], atol=1e-6) for k in frozen)
    assert _close(plain[0], replayed[0])


def test_a_shape_warms_up_only_on_batches_masked_as_a_graph_records_them(tiny_qwen2_moe):
    """Unpadded rows without packing: transformers drops the mask eagerly but would build it under capture (a layer
    compiled for one recompiles inside the other): nothing is captured, and the stage record says why."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    unpadded = _batches(model.config.vocab_size)
    full = lambda step: {**unpadded(step), "attention_mask": torch.ones_like(unpadded(step)["input_ids"])}  # noqa: E731
    plain = _train(model, start, batches=full)
    graphs = StepGraphs(capture=recorded(list(model.parameters())))
    replayed = _train(model, start, batches=full, graphs=graphs)
    assert graphs.summary() == {"shapes": 0, "replays": 0,
                                "off": "no batch took the path a graph records (rows of one example each, or no padding)"}
    assert _close(plain[0], replayed[0])
    checked = []
    many = StepGraphs(capture=recorded(list(model.parameters())), alike=lambda part: checked.append(1) or False)
    _train(model, start, batches=lambda step: full(step % STEPS), steps=12, graphs=many)
    assert len(checked) == 8 and many.off == many.summary()["off"]  # the check syncs: it stops after 8 misses
    short = StepGraphs(capture=recorded(list(model.parameters())))
    _train(model, start, graphs=short, steps=2)
    assert short.summary()["off"] == "fewer steps than the warm-up"


def test_which_batches_are_masked_alike():
    ids = torch.zeros(2, 6, dtype=torch.long)
    one_example_a_row = torch.arange(6).repeat(2, 1)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    assert recorded_alike({"input_ids": ids, "position_ids": packed})
    assert not recorded_alike({"input_ids": ids, "position_ids": one_example_a_row})
    assert recorded_alike({"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])})
    assert not recorded_alike({"input_ids": ids, "attention_mask": torch.ones(2, 6)})
    assert not recorded_alike({"input_ids": ids})


def test_which_stages_use_graphs(monkeypatch):
    cuda = torch.device("cuda")
    assert graphs_off_reason(torch.device("cpu"), distributed=False) == "not a CUDA device"
    assert graphs_off_reason(cuda, distributed=False) is None
    assert graphs_off_reason(cuda, distributed=True) == "several processes (collectives stay eager)"
    monkeypatch.setenv("DSFT_CUDA_GRAPHS", "0")
    assert graphs_off_reason(cuda, distributed=False) == "DSFT_CUDA_GRAPHS=0"


def test_the_head_runs_on_every_position_while_a_graph_records(monkeypatch):
    """Under capture the loss cannot pick out the labelled positions (a data-sized tensor): it runs the head on all
    of them, with the same loss and gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 10))
    labels[0, :6] = -100  # a prompt
    rows = []  # positions the head ran on
    head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    selected = chunked_ce.chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
    selected.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    assert sum(rows) == 2 * 9 - 5  # the labelled next-token positions only (row 0: targets 1-5 are its prompt)
    rows.clear()
    monkeypatch.setattr(chunked_ce, "capturing", lambda t: True)
    everywhere = chunked_ce.chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
    everywhere.backward()
    assert sum(rows) == 2 * 9  # every position
    assert torch.allclose(selected, everywhere, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], head.weight.grad, atol=1e-6)


def test_a_capture_that_fails_inside_a_checkpointed_layer_leaves_no_trace(tiny_qwen2_moe):
    """torch < 2.12: an activation checkpoint whose function raises stays half-entered (its saved-tensor hooks on
    autograd's stack) until the exception's frames are freed; a fallback step run meanwhile would save its tensors
    through those hooks and fail in backward (on an H200 with torch 2.11: CheckpointError). Emulated here: the
    failed capture leaves such a context behind, whose hooks refuse to be used."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    plain = _train(model, start)

    def stale_hooks(tensor):
        raise AssertionError("a tensor saved through the failed capture's checkpoint")

    def half_entered():
        with torch.autograd.graph.saved_tensors_hooks(stale_hooks, stale_hooks):
            yield

    def fails_like_torch_2_11(run):
        context = half_entered()  # noqa: F841 - alive as long as this frame is (the traceback's)
        next(context)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = StepGraphs(capture=fails_like_torch_2_11)
    with pytest.warns(UserWarning, match="capture failed"):
        replayed = _train(model, start, graphs=graphs)
    assert _close(plain[0], replayed[0])


def test_a_failed_capture_ends_the_capture_leaves_its_stream_and_reports_the_first_error(monkeypatch):
    """``cuda_capture``'s own control flow (torch.cuda.graph's ``__exit__`` leaves the capture stream current when
    ``capture_end`` raises, and reports the invalidated capture instead of its cause), with CUDA's parts stubbed."""
    from contextlib import contextmanager

    from dsft.recipes import graphs

    log, current = [], ["main"]

    class Graph:
        def capture_begin(self, pool=None):
            log.append(("begin", pool, current[0]))

        def capture_end(self):
            log.append(("end", current[0]))
            raise RuntimeError("operation failed due to a previous error during capture")

        def replay(self):
            log.append("replay")

    class Stream:
        def __init__(self, name="capture"):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    @contextmanager
    def on(stream):
        before, current[0] = current[0], stream.name
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream(current[0]))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    capture = graphs.cuda_capture()

    def run():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        capture(run)
    assert ("begin", "pool", "capture") in log and ("end", "capture") in log and current == ["main"]


def test_a_stage_training_through_varlen_attention_captures_every_batch(home, monkeypatch):
    """The stage wiring a one-process GPU run takes, on the CPU: variable-length attention (its SDPA reference),
    each batch with its examples' lengths, graphs that count every batch as recorded alike (no mask is built),
    captured by the CPU stand-in above; the stage trains as it does without graphs."""
    from contextlib import contextmanager

    import dsft
    from dsft.kernels import varlen
    from dsft.recipes import graphs as graphs_module
    from dsft.recipes import stages

    made, parts = [], []

    @contextmanager
    def varlen_attention(model, device):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        before = base.config._attn_implementation
        varlen.register()
        base.set_attn_implementation(varlen.VARLEN)
        try:
            yield varlen.VARLEN
        finally:
            base.set_attn_implementation(before)

    class OnTheCpu(graphs_module.StepGraphs):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            made.append(self)

        def bind(self, fn, params):
            self._capture = recorded(params)
            return super().bind(fn, params)

        def __call__(self, part, weight, aux_share):
            parts.append(part)
            return super().__call__(part, weight, aux_share)

    monkeypatch.setattr(stages, "training_attention", varlen_attention)
    monkeypatch.setattr(stages, "StepGraphs", OnTheCpu)
    eager = dsft.train(domain="finance", max_steps=4).metrics["stages"][0]  # on the CPU: no graphs
    assert not made
    monkeypatch.setattr(stages, "graphs_off_reason", lambda device, distributed: None)
    stage = dsft.train(domain="finance", max_steps=4).metrics["stages"][0]
    assert stage["attention"] == eager["attention"] == varlen.VARLEN
    assert len(made) == 1 and made[0]._alike is graphs_module.no_mask_built
    assert made[0].summary() == {"shapes": 1, "replays": 2, "off": None}  # 2 warm-ups, then steps 3 and 4 replayed
    assert parts and all(part["seq_lens"].shape[0] == part["input_ids"].shape[0] for part in parts)
    assert stage["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-5)


def test_a_capture_out_of_memory_is_tried_again_once_a_step_freed_memory(tiny_qwen2_moe):
    """``dsft train --keep-layers auto``: the capture runs out of memory, so does the eager step after it; the loop's
    ``on_out_of_memory`` frees memory (layers recompute again), and the next capture is tried and replayed."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    plain = _train(model, start)
    params = list(model.parameters())
    works, short = recorded(params), {"capture": 1, "eager": 0}

    def capture(run):
        if short["capture"]:
            short["capture"], short["eager"] = 0, 1  # the eager step that follows runs short too
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.56 GiB")
        return works(run)

    def loss_fn(m, part):
        if short["eager"]:
            short["eager"] = 0
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.56 GiB")
        from dsft.recipes.loop import default_loss
        return default_loss(m, part)

    freed = []
    graphs = StepGraphs(capture=capture, on_warning=lambda message: None)
    replayed = _train(model, start, graphs=graphs, loss_fn=loss_fn, on_out_of_memory=lambda: freed.append(1) or True)
    assert freed == [1]
    assert graphs.summary()["off"] is None and graphs.summary()["replays"] > 0 and len(works.captures) == 1
    assert _close(plain[0], replayed[0])
