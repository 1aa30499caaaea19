"""Pipeline stages and schedules (torch.distributed.pipelining) for HF causal LMs.

A stage is a deep copy of the whole (meta) model with the parts it does not own set to None and
its blocks kept in a ModuleDict under their original index, so parameter names are those of the
full model: checkpoints, gradient comparisons and offline caches do not depend on the split.
A model without pipelining is the one-stage case of the same code (one forward for everything).

The KD loss is the schedule's ``loss_fn``. The ``target`` handed to the schedule is the
micro-batch index ([n_mb, 1] int64, chunked along dim 0 like any target): the loss function
looks the teacher target and labels up by that index, because a teacher target is several
tensors (top-k values, indices, tail mass), and in disaggregated runs it is received lazily,
only when the last stage needs it.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from kdplan.schema import Layout
from kdplan.schema.layers import layer_ranges, split_layers

from .models import embed


def stage_layer_ranges(layout: Layout, num_layers: int) -> list[tuple[int, int]]:
    """[first, last) block range of every virtual stage, from the plan or by the planner's rule."""
    if layout.stages:
        return [(s.first_layer, s.last_layer) for s in layout.stages]
    return layer_ranges(split_layers(num_layers, layout.pp * layout.virtual_stages))


def stages_of_rank(layout: Layout, pp_rank: int) -> list[int]:
    """Loop placement: pp rank p runs virtual stages p, p + pp, p + 2 pp, ..."""
    return list(range(pp_rank, layout.pp * layout.virtual_stages, layout.pp))


def lm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token ids (first stage) or hidden states -> hidden states or logits (last stage).
    Causal attention comes from SDPA's is_causal with attention_mask=None (no [T, T] mask).
    The residual stream is held in the stage's ``act_dtype`` (bf16 in a bf16 plan, whatever the
    weights' dtype): what pipeline stages send and sequence-parallel ranks gather."""
    inner = self.model
    first = inner.embed_tokens is not None
    seq_len = x.shape[1] if first else x.shape[1] * getattr(self, "sp_degree", 1)
    pos = torch.arange(seq_len, device=x.device).unsqueeze(0)
    h = embed(inner, x).to(self.act_dtype) if first else x
    pos_emb = inner.rotary_emb(h, pos)
    for block in inner.layers.values():
        h = block(h, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
    if inner.norm is not None:
        h = inner.norm(h)
    if self.lm_head is not None:
        h = self.lm_head(h)
    return h


def make_stage(model: nn.Module, first: int, last: int, *, is_first: bool, is_last: bool,
               act_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Deep copy of ``model`` owning blocks [first, last) (and the embedding / head if first /
    last), holding its residual stream in ``act_dtype``. Call it on the meta model: copying costs
    nothing and no rank ever holds layers it does not run."""
    m = copy.deepcopy(model)
    m.config._attn_implementation = "sdpa"
    m.act_dtype = act_dtype
    layers = m.model.layers
    m.model.layers = nn.ModuleDict({str(i): layers[i] for i in range(first, last)})
    if not is_first:
        m.model.embed_tokens = None
        if getattr(m.model, "embed_positions", None) is not None:
            m.model.embed_positions = None
    if not is_last:
        m.model.norm = None
        m.lm_head = None
    m.forward = types.MethodType(lm_forward, m)
    return m


def whole_model(model: nn.Module, act_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The one-stage case: same forward, same names."""
    return make_stage(model, 0, model.config.num_hidden_layers, is_first=True, is_last=True, act_dtype=act_dtype)


def build_stages(model: nn.Module, layout: Layout, pp_rank: int,
                 act_dtype: torch.dtype = torch.float32) -> tuple[list[nn.Module], list[int]]:
    ranges = stage_layer_ranges(layout, model.config.num_hidden_layers)
    ids = stages_of_rank(layout, pp_rank)
    n = len(ranges)
    return [make_stage(model, *ranges[i], is_first=i == 0, is_last=i == n - 1, act_dtype=act_dtype)
            for i in ids], ids


def build_schedule(parts: list[nn.Module], stage_ids: list[int], layout: Layout, *, pp_group,
                   device: torch.device, n_microbatches: int, loss_fn):
    """PipelineStage per owned stage, and the plan's schedule. Gradients are not rescaled by the
    schedule: the loss function already divides by the global token count."""
    # Imported here: torch.distributed.pipelining costs ~2 s of start-up on a busy 2-core machine.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    n = layout.pp * layout.virtual_stages
    stages = [PipelineStage(p, i, n, device, group=pp_group) for p, i in zip(parts, stage_ids)]
    if layout.virtual_stages > 1 or layout.schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if layout.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
