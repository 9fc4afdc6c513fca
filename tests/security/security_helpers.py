"""Helpers of the security tests (a uniquely named module, not conftest, so it imports from anywhere)."""
from __future__ import annotations

import subprocess


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a refused command prints (asserting there is exactly one, and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def write_peft_dir(d, *, r: int = 4, hidden: int = 64) -> None:
    """A small PEFT LoRA directory as ``save_pretrained`` writes it (config + safetensors), for imports."""
    import json

    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(r, hidden), f"{prefix}.lora_B.weight": torch.zeros(hidden, r)},
              str(d / "adapter_model.safetensors"))
