"""What the machine computes natively: the choice behind ``precision: auto``."""

from __future__ import annotations

from pathlib import Path


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere
    bfloat16 autocast is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, accelerator: str = "cpu") -> str:
    """``auto`` -> ``bf16-mixed`` where bfloat16 is native (a CPU with AVX512-BF16 or AMX, a
    CUDA GPU that supports it), else ``32``; any other value is returned as given."""
    if precision != "auto":
        return precision
    import torch

    gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"
