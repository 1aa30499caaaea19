"""Weight-only fake quantization of the teacher (plan: ``teacher.layout.forward_precision``).

A plan may run the forward-only teacher in fp8 or int8 (``kdplan plan --teacher-precision``):
the planner then prices its block GEMMs on the fp8 / int8 tensor cores. The executor honours the
choice *numerically*: when it loads the teacher, every Linear weight of the transformer blocks
(2-D ``model.layers.*.weight``: q/k/v/o and the MLP matrices) is quantized per output channel and
dequantized back to the compute dtype:

- int8: symmetric absmax per output channel, scale = max|w_row| / 127, q = round(w / scale)
  clamped to [-127, 127];
- fp8:  ``torch.float8_e4m3fn`` with a per-output-channel scale max|w_row| / 448 (e4m3's
  largest finite value), q = (w / scale) cast to e4m3.

Embeddings, the LM head and the norms stay exact (the planner prices them at the job precision
too). So the teacher's outputs are those of a quantized teacher — the fidelity the user traded
for speed, measured by ``benchmarks/compression_quality.py`` — but nothing runs faster here: the
GEMMs still run in bf16/fp32 on dequantized weights (no fp8/int8 kernels on CPU, and none are
wired on GPU yet). Activations are not quantized (weight-only), so the numerics are those of
weight quantization, a lower bound on the error of a W8A8 kernel.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
FORMATS = ("fp8", "int8")


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` ([out, in]) quantized per output channel (row) to ``fmt`` and dequantized back
    (same dtype and shape)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown teacher precision {fmt!r} (expected one of {', '.join(FORMATS)})")
    x = w.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    top = FP8_MAX if fmt == "fp8" else INT8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    if fmt == "int8":
        q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX)
    else:
        q = (x / scale).to(torch.float8_e4m3fn).float()
    return (q * scale).to(w.dtype)


def quantizes(key: str, t: torch.Tensor) -> bool:
    """True for the weights a quantized teacher quantizes: 2-D Linear weights inside the blocks."""
    return t.ndim == 2 and ".layers." in f".{key}" and key.endswith(".weight")


def weight_transform(fmt: str):
    """A ``load_checkpoint`` transform (HF key, full tensor) -> tensor for teacher precision ``fmt``;
    None for the exact teacher ("bf16")."""
    if fmt == "bf16":
        return None
    if fmt not in FORMATS:
        raise ValueError(f"unknown teacher precision {fmt!r}")
    return lambda key, t: fake_quantize(t, fmt) if quantizes(key, t) else t
