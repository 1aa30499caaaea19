"""One function per parallelism technique, applied to a (possibly pipeline-pruned) HF causal LM.

Modules follow the HF Llama / Mistral / Qwen2 names: ``model.embed_tokens``, ``model.layers[i]``
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``), ``model.norm``, ``lm_head``. A pipeline stage has the parts it does
not own set to None (executor/pipeline.py), so every function skips missing parts.

ZeRO mapping onto FSDP2: zero=3 -> fully_shard (parameters, gradients and optimizer state sharded,
parameters re-gathered in backward); zero=1 and zero=2 -> fully_shard with
reshard_after_forward=False (FSDP2 has no optimizer-only sharding, so ZeRO-1 runs as ZeRO-2: the
same memory for optimizer state, gradients sharded too, which only saves memory).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.nn.parallel import DistributedDataParallel as DDP

from .kd.grad_hooks import ByteCounter, Int8HookState, allreduce_counting_hook, int8_hook


def blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers.values() if isinstance(model.model.layers, nn.ModuleDict)
                else model.model.layers)


def _cast_input(dtype: torch.dtype):
    """Forward pre-hook: the module's first positional or ``hidden_states`` input cast to ``dtype``.
    Registered in front of TP's input redistribution, so that a sequence-parallel all-gather moves
    the compute dtype: the input feeds only Linear layers, which autocast casts to ``dtype`` anyway,
    so the cast changes no number, only the bytes gathered."""

    def hook(module, args, kwargs):
        if args:
            return (args[0].to(dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)}

    return hook


def apply_tp(model: nn.Module, tp: DeviceMesh, *, sequence_parallel: bool, dtype: torch.dtype = torch.float32) -> None:
    """Megatron-style TP over ``tp``: column-parallel q/k/v, gate/up (or the plain MLP's up);
    row-parallel o, down. The embedding is row-parallel (vocab-sharded) and the head
    column-parallel with replicated (all-gathered) logits, so the KD loss sees ordinary
    full-vocabulary tensors. With sequence parallelism the norms run on sequence shards and the
    all-reduces become reduce-scatter + all-gather pairs; the gathered inputs of attention, MLP
    and head are cast to the compute ``dtype`` first (the norms' fp32 weights would otherwise
    promote them to fp32)."""
    inner = model.model
    seq = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if inner.embed_tokens is not None:
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if inner.norm is not None and sequence_parallel:
        top["model.norm"] = SequenceParallel()
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    if top:
        parallelize_module(model, tp, top)
    if sequence_parallel:
        model.sp_degree = tp.size()  # hidden states between pipeline stages hold T / tp positions
    for block in blocks(model):
        plan = {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan.update({
                "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        if not hasattr(block.mlp, "gate_proj"):  # plain (non-gated) MLP
            del plan["mlp.gate_proj"]
        parallelize_module(block, tp, plan)
        if sequence_parallel and dtype != torch.float32:
            for mod in (block.self_attn, block.mlp):
                mod.register_forward_pre_hook(_cast_input(dtype), prepend=True, with_kwargs=True)
    if sequence_parallel and dtype != torch.float32 and model.lm_head is not None:
        model.lm_head.register_forward_pre_hook(_cast_input(dtype), prepend=True, with_kwargs=True)


# The attention core (softmax(QK^T/sqrt(d)) V): the kernels scaled_dot_product_attention dispatches
# to, and the ops of its math path. Selective recomputation recomputes these and keeps the rest.
ATTENTION_CORE_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                      "_scaled_dot_product_attention_math", "_softmax", "bmm", "baddbmm")


def _attention_core_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    name = getattr(getattr(op, "overloadpacket", op), "__name__", str(op))
    return CheckpointPolicy.PREFER_RECOMPUTE if name in ATTENTION_CORE_OPS else CheckpointPolicy.MUST_SAVE


def apply_ac(model: nn.Module, recompute: str) -> None:
    """Activation recomputation per block, as the cost model prices it (kdplan.cost.memory):
    ``full`` keeps only each block's input and recomputes the block in backward; ``selective``
    (Korthikanti et al.) recomputes only the attention core (the scaled-dot-product attention
    kernel, or its softmax / batched matmuls) and keeps every other activation, through
    torch.utils.checkpoint's selective policy. The composable ``checkpoint`` keeps parameter
    names unchanged."""
    if recompute == "none":
        return
    context_fn = None
    if recompute == "selective":
        try:
            from torch.utils.checkpoint import create_selective_checkpoint_contexts
        except ImportError:  # torch < 2.4; 2.11 and 2.13 have it
            raise RuntimeError("recompute = 'selective' needs torch.utils.checkpoint."
                               "create_selective_checkpoint_contexts (torch >= 2.4)") from None
        context_fn = functools.partial(create_selective_checkpoint_contexts, _attention_core_policy)
    for block in blocks(model):
        if context_fn is None:
            checkpoint(block)
        else:
            checkpoint(block, context_fn=context_fn)


def apply_fsdp(model: nn.Module, dp: DeviceMesh, *, zero: int, dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 over ``dp``: one unit per block, then the root (embedding, norm, head). Shards stay
    fp32 (master weights, fp32 Adam state); parameters are all-gathered in the compute ``dtype``
    and gradients reduce-scattered in fp32."""
    reshard = zero >= 3
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mesh=dp, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=dp, reshard_after_forward=reshard, mp_policy=mp)


def apply_ddp(model: nn.Module, dp_group, *, grad_compression: str, counter: ByteCounter) -> nn.Module:
    """DDP over ``dp_group``. int8: gradients travel as 8-bit per-bucket quantised values with
    error feedback (executor/kd/grad_hooks.py); otherwise an fp32 all-reduce that counts bytes."""
    with warnings.catch_warnings():  # torch 2.13 deprecates the flag; its replacement is not out yet
        warnings.simplefilter("ignore", FutureWarning)
        # No buffer broadcast per forward: the only buffers (rotary frequencies) are identical everywhere.
        ddp = DDP(model, process_group=dp_group, broadcast_buffers=False)
    state = Int8HookState(process_group=dp_group, counter=counter)
    ddp.register_comm_hook(state, int8_hook if grad_compression == "int8" else allreduce_counting_hook)
    return ddp


class _FlatBucket:
    """The two methods of dist.GradBucket the comm hooks use, over one flat gradient buffer."""

    def __init__(self, buf: torch.Tensor):
        self._buf = buf

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return 0


class GradSync:
    """Data-parallel gradient averaging where DDP cannot wrap the module: TP (DTensor
    parameters) and pipeline stages (the schedule's shape-inference pass confuses DDP's bucket
    rebuild). One flat buffer of the local gradients goes through the same comm hook as DDP's
    (fp32 all-reduce, or int8 with error feedback), after the last micro-batch."""

    def __init__(self, dp_group, *, grad_compression: str, counter: ByteCounter):
        self.state = Int8HookState(process_group=dp_group, counter=counter)
        self.hook = int8_hook if grad_compression == "int8" else allreduce_counting_hook

    def __call__(self, params) -> None:
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.hook(self.state, _FlatBucket(flat)).wait()
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


def freeze_teacher(model: nn.Module) -> nn.Module:
    """The teacher runs forward only: eval mode, no gradients, hence no optimizer state."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parallelize_student(model: nn.Module, mesh, *, layout, counter: ByteCounter, init,
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """Order matters: TP first (it turns Linear weights into DTensors), then activation
    checkpointing (on blocks whose weights are final), then FSDP (shards the TP shards over dp),
    then ``init`` fills the local shards (meta -> real), and only then DDP, which broadcasts real
    weights when it wraps. TP or PP with dp > 1 and zero = 0 average gradients with GradSync.
    ``dtype`` is the compute dtype (parameters stay fp32: see executor.train.compute_dtype)."""
    if layout.tp > 1:
        apply_tp(model, mesh.sub("tp"), sequence_parallel=layout.sequence_parallel, dtype=dtype)
    apply_ac(model, layout.recompute)
    if layout.dp > 1 and layout.zero > 0:
        apply_fsdp(model, mesh.sub("dp"), zero=layout.zero, dtype=dtype)
    init(model)
    if layout.dp > 1 and layout.zero == 0 and layout.tp == 1 and layout.pp == 1:
        model = apply_ddp(model, mesh.group("dp"), grad_compression=layout.grad_compression, counter=counter)
    return model


def needs_grad_sync(layout) -> bool:
    """dp > 1 without ZeRO where DDP cannot be used (see GradSync)."""
    return layout.dp > 1 and layout.zero == 0 and (layout.tp > 1 or layout.pp > 1)


def parallelize_teacher(model: nn.Module, mesh, *, layout, init, counter: ByteCounter | None = None) -> nn.Module:
    """Forward only: TP if asked, expert parallelism if ``ep > 1`` (each rank keeps its ep share
    of the routed experts, executor/expert_parallel.py), then FSDP over the teacher's dp group
    when ``zero = 3`` (the weights sharded, all-gathered block by block for each forward and freed
    after it; nothing is trained, so nothing is reduced), then weights; never DDP, never
    recompute (no backward)."""
    if layout.tp > 1:
        apply_tp(model, mesh.sub("tp"), sequence_parallel=layout.sequence_parallel)  # weights already in dtype
    if layout.ep > 1:
        from .expert_parallel import apply_ep
        if not apply_ep(model, mesh.sub("ep"), counter):
            raise ValueError(f"teacher.layout.ep = {layout.ep} but the teacher has no routed experts")
    if layout.zero >= 3 and layout.dp > 1:  # shards in the teacher's own dtype, gathered as they are
        apply_fsdp(model, mesh.sub("dp"), zero=3, dtype=next(model.parameters()).dtype)
    init(model)
    if layout.ep > 1:
        from .expert_parallel import localize_experts
        localize_experts(model)
    return freeze_teacher(model)
