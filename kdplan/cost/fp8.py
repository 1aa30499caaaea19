"""fp8 training of a student (Layout.train_precision = "fp8"): what it changes in the cost model.

One rule, Transformer Engine's (NVIDIA TE 1.x, ``transformer_engine/pytorch/module/linear.py``,
``layernorm_linear.py``, ``layernorm_mlp.py``; the recipe Megatron-Core / NeMo run, as in the
MLPerf GPT-3 and FlagPerf Llama-3 rows):

- Time: every Linear GEMM of the blocks runs on the fp8 tensor cores, forward (fprop, e4m3
  inputs and weights) and backward (dgrad and wgrad, e5m2 gradients): priced at the profile's
  ``fp8_tflops`` with the bf16 efficiency curve times ``low_precision_derating`` (compute.layer_time
  with ``gemm_precision="fp8"``; the backward is twice the forward, so its GEMMs are fp8 too). The
  attention core, norms, activations, the LM head and the loss stay at the job's precision
  (bf16). The casts to fp8 (fused into the norms and the transposes by TE) are in the derating.
- Memory: the master weights, gradients and optimizer states are bf16 mixed precision's
  (unchanged). TE keeps an fp8 copy of each block Linear weight and its transpose (the wgrad /
  dgrad GEMMs need the other layout on Hopper), cached across the micro-batches of a step
  (Megatron passes ``is_first_microbatch``): 2 B per Linear weight the GPU holds; under ZeRO-3 the
  weights are gathered block by block, so only the gathered block's copies live (2 B per Linear
  weight of one block). Each Linear saves its input for the weight gradient in fp8 (1 B per
  element instead of the job's q): the QKV and first-MLP inputs (the norms' outputs), the
  attention output projection's input and the second MLP matmul's input.
- Communication: unchanged (bf16 parameter all-gathers, fp32/bf16 gradient reductions), except
  with fp8 parameters (Overheads.fp8_params: NeMo ``FP8_PARAMS``, Megatron-Core
  ``--fp8-param-gather``, as the MLPerf Training v4.0 GPT-3 rows ran): the block Linear weights
  live in fp8, so the distributed optimizer all-gathers them (and ZeRO-3 gathers them) at 1 byte,
  and the GPU holds them at 1 byte with only TE's fp8 transpose beside them (fp8_param_saving).

Only on devices whose profile has ``fp8_tflops`` (H100/H200/H800); elsewhere a layout training in
fp8 is invalid (role._check) and the job is refused (teacher_precision.student_fp8_error).
"""

from __future__ import annotations

from ..schema import ModelSpec
from .memory import active_ffn_width, checkpointed_fraction

FP8_WEIGHT_COPIES = 2  # bytes per block Linear weight: the fp8 weight and its fp8 transpose (TE cache)
FP8_SAVED_INPUT_BYTES = 1  # a Linear's input saved for the weight gradient, in fp8


def block_linear_params(model: ModelSpec, ep: int = 1, layer_params: float | None = None) -> float:
    """Parameters of one block's Linear weights (all tp ranks together; 1/ep of the routed experts
    for an expert-parallel rank, whose ``layer_params`` the caller gives): the attention
    projections and the MLP matmuls, or everything but the norms for MoE / MLA blocks."""
    if model.moe is not None or model.mla is not None:
        return (layer_params if layer_params is not None else model.layer_params()) - model.norm_params()
    h, f = model.hidden_size, model.ffn_hidden_size
    return sum(model.attention_matmul_params()) + h * f * (3 if model.gated_mlp else 2)


def fp8_weight_cache_bytes(model: ModelSpec, *, n_layers: int, tp: int, zero: int, fp8_params: bool = False) -> float:
    """Bytes of the fp8 weight copies (weight + transpose) one GPU keeps: its stage's blocks, or
    one gathered block under ZeRO-3. With fp8 parameters (Overheads.fp8_params) the weight itself
    is fp8 and counted with the weights, so only the transpose is extra."""
    blocks = 1 if zero >= 3 else n_layers
    return blocks * block_linear_params(model) / tp * (FP8_WEIGHT_COPIES - (1 if fp8_params else 0))


def fp8_saved_input_saving(model: ModelSpec, *, b: int, s: int, tp: int, sequence_parallel: bool, q: int,
                           recompute: str, selective: str = "attention_core", block_fraction: float = 0.5) -> float:
    """Bytes per block and micro-batch that fp8 training saves on the activations the block stores
    (memory.activation_bytes_per_layer counts them at q bytes): the four GEMM inputs saved in fp8.
    Nothing under full recompute (only the block input is stored) or torch's op-level policy (it
    stores matmul outputs, not inputs: not counted); block-level selective policies save it on the
    blocks they do not checkpoint."""
    per = max(0, q - FP8_SAVED_INPUT_BYTES)
    if recompute == "full" or per == 0 or (recompute == "selective" and selective == "op_policy"):
        return 0.0
    keep = 1.0
    if recompute == "selective" and selective in ("every_other_block", "blocks"):
        keep = 1.0 - checkpointed_fraction(selective, block_fraction)
    sb = s * b
    outer = 2 * sb * model.hidden_size / (tp if sequence_parallel else 1)  # QKV and first-MLP inputs
    inner = sb * (model.q_width + active_ffn_width(model)) / tp  # output projection and second MLP inputs
    return keep * per * (outer + inner)


def fp8_param_saving(model: ModelSpec, *, n_layers: int, tp: int, q: int) -> float:
    """Bytes of one GPU's weights (its stage's blocks, tp-sharded) that fp8 parameters
    (Overheads.fp8_params) save on every copy of them the job's precision would hold or move: the
    block Linear weights at 1 byte instead of ``q``. Subtracted from the stage's weight bytes (the
    distributed optimizer's all-gather of the updated weights, ZeRO-3 gathers and the weights held),
    and, with the weights themselves fp8, TE's fp8 cache keeps only the transpose
    (fp8_weight_cache_bytes with ``fp8_params``)."""
    return n_layers * block_linear_params(model) / tp * max(0, q - FP8_SAVED_INPUT_BYTES)


__all__ = ["FP8_WEIGHT_COPIES", "FP8_SAVED_INPUT_BYTES", "block_linear_params", "fp8_weight_cache_bytes",
           "fp8_saved_input_saving", "fp8_param_saving"]
