"""A quantized teacher, stored as the plan prices it (plan: ``teacher.layout.forward_precision``).

A plan may run the forward-only teacher in fp8 or int8 (``kdplan plan --teacher-precision``): the
planner then counts its block Linear weights at 1 byte each plus one fp32 scale per output channel
(``kdplan.cost.role.block_weight_bytes``) and prices their GEMMs on the fp8 / int8 tensor cores.
The executor stores them so: when it builds the teacher, every Linear of the transformer blocks
(q/k/v/o and the MLP matrices: ``quantizes``) becomes a ``QuantLinear`` holding

- int8: ``int8`` values, symmetric absmax per output channel, scale = max|w_row| / 127,
  q = round(w / scale) clamped to [-127, 127];
- fp8:  ``float8_e4m3fn`` values, scale = max|w_row| / 448 (e4m3's largest finite value),
  q = (w / scale) cast to e4m3;

and an fp32 scale per output channel. Its forward dequantizes its own weight to the compute dtype
(``dequantize``: one transient copy of one Linear, freed after the matmul) and runs the ordinary
matmul. Embeddings, the LM head, norms and biases stay in the compute dtype, as the planner prices
them. ``fake_quantize`` is the same rounding without the storage (quantize, dequantize back): the
numerical reference, bit for bit equal to what a ``QuantLinear`` multiplies with.

What is not there: fp8 / int8 kernels. The dequantized GEMM runs at the bf16 rate, so a quantized
teacher is smaller here but no faster than priced (``torch._scaled_mm`` would need activations
quantized too, a W8A8 teacher whose numbers would differ from this CPU reference). Activations are
not quantized (weight-only), so the numerics are those of weight quantization, a lower bound on the
error of a W8A8 kernel. The one dequantized Linear alive during a forward (e.g. the MLP's largest
matrix / tp, 2 B per weight in bf16) is not in the plan's memory.

Tensor parallelism: a column-parallel Linear (rows sharded) holds its rows' scales, local; a
row-parallel one (columns sharded) holds every row's scale, computed at load from the full rows
(the planner counts those scales unsharded too). The local values are exactly the matching block of
the full tensor quantized at once. Weight offload streams the quantized values and scales like any
block weight (executor.teacher.WeightStream); teacher zero = 3 is refused (FSDP shards parameters,
and these are int8 / fp8 buffers), and the planner does not offer it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
FORMATS = ("fp8", "int8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # torch >= 2.1 on CPU and CUDA
_LOAD_CHUNK = 1 << 24  # elements read from the checkpoint at a time while quantizing (64 MiB in fp32)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown teacher precision {fmt!r} (expected one of {', '.join(FORMATS)})")


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ([out, in]) quantized per output channel (row): (values [out, in] in ``STORAGE[fmt]``,
    fp32 scales [out, 1]). An all-zero row gets scale 1."""
    _check_format(fmt)
    x = w.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    top = FP8_MAX if fmt == "fp8" else INT8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    if fmt == "int8":
        return torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    return (x / scale).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``, computed in fp32 and rounded once, with no fp32 copy: int8 values
    and e4m3 values are exact in bf16 / fp32, and a mixed-dtype in-place multiply computes in the
    common dtype (fp32) and rounds on store. Equal, bit for bit, to ``(q.float() * scale).to(dtype)``."""
    return q.to(dtype).mul_(scale)


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` ([out, in]) quantized per output channel to ``fmt`` and dequantized back (same dtype
    and shape): the numbers a ``QuantLinear`` built from ``w`` multiplies with."""
    return dequantize(*quantize(w, fmt), w.dtype)


def quantizes(key: str, t: torch.Tensor) -> bool:
    """True for the weights a quantized teacher quantizes: 2-D Linear weights inside the blocks."""
    return t.ndim == 2 and ".layers." in f".{key}" and key.endswith(".weight")


def weight_transform(fmt: str):
    """A ``load_checkpoint`` transform (HF key, full tensor) -> tensor that fake-quantizes what a
    teacher of precision ``fmt`` quantizes (the reference a ``QuantLinear`` teacher is tested
    against, and the benchmarks' fidelity model); None for the exact teacher ("bf16")."""
    if fmt == "bf16":
        return None
    _check_format(fmt)
    return lambda key, t: fake_quantize(t, fmt) if quantizes(key, t) else t


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized: ``qweight`` [out_local, in_local] (int8 or e4m3)
    and ``scale`` [out_local, 1] (fp32) buffers, the bias (if any) a parameter in the compute dtype.

    Built from an ``nn.Linear`` (``from_linear``; meta or not, plain or tensor-parallel) by
    ``quantize_linears``; filled by ``load_quantized``. Under tensor parallelism it keeps the
    Linear's forward hooks (the parallel style's input / output redistribution) and the weight's
    mesh and placements: the dequantized local weight is wrapped as that DTensor again, so the matmul
    and its collectives are the ones of the original Linear."""

    def __init__(self, in_features: int, out_features: int, *, fmt: str, dtype: torch.dtype, local_shape,
                 region, bias: nn.Parameter | None = None, mesh=None, placements=None, device=None):
        super().__init__()
        _check_format(fmt)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.compute_dtype = dtype
        self.region = region  # (rows, cols) slices of the full weight held here
        self.mesh, self.placements = mesh, placements  # None: a plain (not tensor-parallel) Linear
        self.register_buffer("qweight", torch.empty(local_shape, dtype=STORAGE[fmt], device=device))
        self.register_buffer("scale", torch.empty(local_shape[0], 1, dtype=torch.float32, device=device))
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, dtype: torch.dtype) -> "QuantLinear":
        from torch.distributed.tensor import DTensor

        from .models import _local_region

        w = lin.weight
        region = _local_region(w)
        if region is None:
            raise ValueError(f"a quantized teacher needs Shard/Replicate Linear weights, got {w.placements}")
        dt = isinstance(w, DTensor)
        local = w.to_local() if dt else w
        q = cls(lin.in_features, lin.out_features, fmt=fmt, dtype=dtype, local_shape=tuple(local.shape),
                region=region, bias=lin.bias, mesh=w.device_mesh if dt else None,
                placements=tuple(w.placements) if dt else None, device=local.device)
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(lin, hooks):
                getattr(q, hooks).update(getattr(lin, hooks))
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.qweight, self.scale, self.compute_dtype)
        if self.mesh is not None:
            from torch.distributed.tensor import DTensor

            w = DTensor.from_local(w, self.mesh, self.placements, run_check=False,
                                   shape=torch.Size((self.out_features, self.in_features)),
                                   stride=(self.in_features, 1))
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def fill(self, read_rows) -> None:
        """Quantize from the full weight: ``read_rows(a, b)`` returns full rows [a, b) (all columns);
        rows are read in chunks, quantized over their whole length, and the local columns kept."""
        rows, cols = self.region
        step = max(1, _LOAD_CHUNK // max(self.in_features, 1))
        for a in range(rows.start, rows.stop, step):
            b = min(a + step, rows.stop)
            q, s = quantize(read_rows(a, b), self.fmt)
            i = a - rows.start
            self.qweight[i:i + b - a].copy_(q[:, cols].to(self.qweight.device))
            self.scale[i:i + b - a].copy_(s.to(self.scale.device))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"dtype={self.compute_dtype}, local={tuple(self.qweight.shape)}, bias={self.bias is not None}")


def quantize_linears(model: nn.Module, fmt: str, *, dtype: torch.dtype) -> list[str]:
    """Replace every Linear whose weight ``quantizes`` by a ``QuantLinear`` (call it on the meta
    model, after tensor parallelism, before loading); returns the replaced HF module names."""
    from .models import param_key

    _check_format(fmt)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and quantizes(param_key(name) + ".weight", mod.weight)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear.from_linear(lin, fmt, dtype))
    return [param_key(n) for n, _ in targets]


@torch.no_grad()
def load_quantized(model: nn.Module, path) -> None:
    """Fill every ``QuantLinear`` of ``model`` (allocated) from the HF safetensors checkpoint at
    ``path``: full rows read in chunks (never the whole tensor, never the whole checkpoint)."""
    import contextlib

    import safetensors

    from .models import _checkpoint_files, param_key

    files = _checkpoint_files(Path(path))
    quantized = [(param_key(n) + ".weight", m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safetensors.safe_open(str(f), framework="pt"))
                   for f in sorted({files[k] for k, _ in quantized if k in files})}
        for key, mod in quantized:
            if key not in files:
                raise ValueError(f"{path}: checkpoint lacks {key}")
            sl = handles[files[key]].get_slice(key)
            if tuple(sl.get_shape()) != (mod.out_features, mod.in_features):
                raise ValueError(f"{path}: {key} has shape {tuple(sl.get_shape())}, the model expects "
                                 f"{(mod.out_features, mod.in_features)}")
            mod.fill(lambda a, b, sl=sl, n=mod.in_features: sl[a:b, 0:n])


def load_teacher(model: nn.Module, path, fmt: str, *, device, dtype: torch.dtype) -> nn.Module:
    """``load_checkpoint`` for a teacher of precision ``fmt``: bf16 loads as is; fp8 / int8 first
    turn the block Linears into ``QuantLinear`` (on the meta model), then load the rest in
    ``dtype`` and the quantized weights."""
    from .models import load_checkpoint

    if fmt == "bf16":
        return load_checkpoint(model, path, device=device)
    quantize_linears(model, fmt, dtype=dtype)
    load_checkpoint(model, path, device=device)
    load_quantized(model, path)
    return model
