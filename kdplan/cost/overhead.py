"""Fixed framework costs of the executor: what no FLOP or byte term prices.

At small shapes a step is bound by calls, not by work: every op of a block is a kernel launch on
a GPU (a dispatch on a CPU), every FSDP2 unit runs its hooks, every DTensor op its sharding
propagation, AdamW touches each parameter tensor. ``kdplan profile`` measures these as the
intercepts of time against tokens (executor.bench, fitted in kdplan.calibrate.fit) and stores
them in ``Overheads.framework`` (FrameworkOverheads) and ``Overheads.layer_overhead_s``. Here
they are priced, per mechanism:

- per micro-batch, per pipeline stage: ``micro_batch_s`` (training) or
  ``forward_micro_batch_s`` (forward only) once: the stage's module call, embedding / head /
  loss calls and the autograd engine's start;
- per block, per micro-batch: ``layer_overhead_s`` (its launches), ``tp_block_s`` when tp > 1
  (DTensor), and ``fsdp_unit_s`` per FSDP2 unit (each block, and the stage's root unit) when the
  role is sharded (dp > 1, zero >= 1);
- per optimizer step: ``optimizer_tensor_s`` per parameter tensor of the stage, and on a DDP
  role (dp > 1, zero 0) ``ddp_sync_byte_s`` per gradient byte of its synchronisation, priced with
  the gradient all-reduce it surrounds (kdplan.cost.role._gradient_reduction).

A training micro-batch's fixed cost is split a third forward, two thirds backward (as
``layer_overhead_s``); a forward-only role pays only its forward costs. The collectives' own
latency is each link's ``latency_us`` (kdplan.cost.comm), not counted here.
"""

from __future__ import annotations

from ..schema.cluster import FrameworkOverheads, Overheads
from ..schema.model import ModelSpec

FORWARD_SHARE = 1.0 / 3.0  # of a training micro-batch's fixed cost: the backward runs about 2x the calls


def framework_overhead_s(ov: Overheads, *, train: bool, n_layers: int, tp: int,
                         fsdp: bool) -> tuple[float, float]:
    """(forward, backward) fixed seconds per micro-batch on one pipeline stage holding
    ``n_layers`` blocks. ``fsdp``: the role's blocks are FSDP2 units (dp > 1 and zero >= 1).
    Forward-only (``train=False``): the forward micro-batch cost, and the forward share of the
    per-block costs (launches, DTensor, FSDP hooks: they run once, with no backward)."""
    fw = ov.framework
    per_block = ov.layer_overhead_s + (fw.tp_block_s if tp > 1 else 0.0) + (fw.fsdp_unit_s if fsdp else 0.0)
    units = n_layers * per_block + (fw.fsdp_unit_s if fsdp else 0.0)  # + the root unit
    if not train:
        return fw.forward_micro_batch_s + FORWARD_SHARE * units, 0.0
    total = fw.micro_batch_s + units
    return FORWARD_SHARE * total, (1.0 - FORWARD_SHARE) * total


def parameter_tensors(model: ModelSpec, n_layers: int, *, first: bool, last: bool) -> int:
    """Parameter tensors a stage of ``n_layers`` blocks holds (what AdamW iterates over): per
    block its Linear weights (Q, K, V, O and 2 or 3 MLP matrices; each expert's 3 and the router
    for MoE), their biases, its norms (weight, + bias for LayerNorm); the embedding (+ learned
    positions) on the first stage, the final norm and the untied output projection on the last."""
    per_norm = 2 if model.norm == "layernorm" else 1
    norms = (4 if model.family in ("gemma2", "gemma3_text") else 2) * per_norm + (2 if model.qk_norm else 0)
    gpt = model.family in ("gpt", "gpt2", "gpt_neox")
    attn = 4 + (3 if model.qkv_bias else 0) + (4 if gpt else 0)
    if model.moe is not None:
        mlp = 3 * (model.moe.num_experts + model.moe.num_shared_experts) + 1
    else:
        mlp = (3 if model.gated_mlp else 2) + (2 if gpt else 0)
    n = n_layers * (attn + mlp + norms)
    if first:
        n += 1 + (1 if model.learned_positions else 0)
    if last:
        n += per_norm + (0 if model.tied_embeddings else 1)
    return n


def optimizer_overhead_s(fw: FrameworkOverheads, tensors: int) -> float:
    """Fixed seconds of one optimizer step over ``tensors`` parameter tensors."""
    return fw.optimizer_tensor_s * tensors


FP32_GRAD_BYTES = 4.0  # the executor's gradients are fp32 (fp32 weights under autocast) whatever travels


def ddp_sync_s(fw: FrameworkOverheads, grad_bytes: float) -> float:
    """Seconds DDP's gradient synchronisation adds to the all-reduce itself, once per optimizer
    step of a data-parallel role without ZeRO (dp > 1, zero 0): the reducer copying ``grad_bytes``
    of gradients into its flat buckets and back and the comm hook's averaging
    (FrameworkOverheads.ddp_sync_byte_s, measured by ``kdplan profile``; 0 where not measured)."""
    return fw.ddp_sync_byte_s * grad_bytes


__all__ = ["FORWARD_SHARE", "FP32_GRAD_BYTES", "ddp_sync_s", "framework_overhead_s", "parameter_tensors", "optimizer_overhead_s"]
