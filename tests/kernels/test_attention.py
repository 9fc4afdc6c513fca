"""Training leaves cuDNN attention out on CUDA (its masked backward NaN, pytorch#196678) and restores the caller's choice."""
from __future__ import annotations

import torch

from dsft.kernels.attention import training_sdpa_backends


def test_cudnn_attention_is_off_while_training_on_cuda_and_restored_after(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DSFT_SDPA_CUDNN", raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    with training_sdpa_backends():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()  # the others stay available
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_dsft_sdpa_cudnn_lets_it_back_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DSFT_SDPA_CUDNN", "1")
    torch.backends.cuda.enable_cudnn_sdp(True)
    with training_sdpa_backends():
        assert torch.backends.cuda.cudnn_sdp_enabled()
