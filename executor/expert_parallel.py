"""Expert parallelism of a forward-only mixture-of-experts teacher (``teacher.layout.ep``).

The teacher's dp ranks form groups of ``ep`` consecutive dp ranks (tp global ranks apart: the
group kdplan's cost model prices, kdplan.schema.Layout.ep). Each rank of a group holds
``num_experts / ep`` of every MoE block's routed experts: the transformers experts module
(Qwen3-MoE, Mixtral and DeepSeek-V3 share one interface: fused ``gate_up_proj`` [E, 2f, h] and
``down_proj`` [E, h, f], called as ``experts(hidden [N, h], top_k_index [N, k], top_k_weights
[N, k])``) is replaced by ``ExpertParallelExperts``, whose two weights are DTensors sharded on
dim 0 over the ep group, so the checkpoint loader and the seeded init fill only this rank's
experts (executor.models._local_region / _local_slice). Attention, routers, dense blocks and
shared experts stay as they are (replicated over dp).

Per MoE block, on each rank, on its own N tokens:
1. sort the N*k (token, expert) assignments by expert (so by owner rank: experts are dealt out in
   contiguous blocks), count them per expert;
2. exchange the counts (one all_to_all_single of E integers) and bring both count vectors to the
   host: the only host sync, and the one all_to_all needs (its split sizes are host lists);
3. dispatch: all_to_all_single of the sorted token vectors (h wide, the activation dtype);
4. run each local expert on the rows it received from every rank;
5. combine: the reverse all_to_all_single, then weight each assignment by its routing weight and
   index_add it into its token, in expert order, as the one-process experts module does.

Written for NCCL: every tensor stays on the activation's device, the counts too; the bytes sent
to other ranks (dispatch and combine payloads, what the cost model prices) are counted under
``expert_parallel``; the 8-byte counts are metadata and not counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .kd.grad_hooks import ByteCounter


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(nn.Module):
    """This rank's ``num_experts / ep`` experts of one MoE block, with the dispatch and combine
    all-to-alls over the ep group (see the module docstring)."""

    def __init__(self, experts: nn.Module, ep_mesh, counter: ByteCounter | None = None):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.num_experts = experts.num_experts
        self.ep = ep_mesh.size()
        if self.num_experts % self.ep:
            raise ValueError(f"ep={self.ep} does not divide {self.num_experts} experts")
        self.local_experts = self.num_experts // self.ep
        self.group = ep_mesh.get_group()
        self.counter = counter
        self.act_fn = experts.act_fn
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]),
                                             requires_grad=p.requires_grad))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n, k = top_k_index.shape
        L, ep = self.local_experts, self.ep
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # by expert, so by owner rank; tokens in order within one
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        sent, recv = torch.stack([counts, recv_counts]).view(2, ep, L).tolist()  # the one host sync
        send_splits = [sum(c) for c in sent]
        recv_splits = [sum(c) for c in recv]

        x = hidden_states[token]
        x_recv = x.new_empty(sum(recv_splits), x.shape[-1])
        dist.all_to_all_single(x_recv, x, recv_splits, send_splits, group=self.group)
        y_recv = self._run_local(x_recv, recv)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, y_recv, send_splits, recv_splits, group=self.group)
        if self.counter is not None:
            me = dist.get_rank(self.group)
            row = x.shape[-1] * x.element_size()
            self.counter.add("expert_parallel", row * (sum(send_splits) - send_splits[me]
                                                       + sum(recv_splits) - recv_splits[me]))

        weights = top_k_weights.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        out.index_add_(0, token, (y * weights).to(out.dtype))
        return out

    def _run_local(self, x_recv: torch.Tensor, recv: list[list[int]]) -> torch.Tensor:
        """Each local expert on the rows every rank sent it: ``x_recv`` holds, per source rank,
        its rows for local expert 0, 1, ... (``recv[source][expert]`` rows each)."""
        L = self.local_experts
        chunks = list(torch.split(x_recv, [c for per_src in recv for c in per_src]))
        w1, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        out = [None] * len(chunks)
        for e in range(L):
            idx = [src * L + e for src in range(len(recv))]
            rows = torch.cat([chunks[i] for i in idx])
            if rows.shape[0] == 0:
                for i in idx:
                    out[i] = chunks[i]
                continue
            gate, up = nn.functional.linear(rows, w1[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, w2[e])
            for i, part in zip(idx, torch.split(y, [chunks[i].shape[0] for i in idx])):
                out[i] = part
        return torch.cat(out) if out else x_recv


@torch.no_grad()
def localize_experts(model: nn.Module) -> None:
    """After the weights are loaded: each ExpertParallelExperts keeps its shard as a plain
    parameter (its local experts; the DTensor only told the loaders which), so that what handles
    plain tensors (WeightStream's host copies, teacher.layout.offload = weights) handles it too."""
    for mod in model.modules():
        if isinstance(mod, ExpertParallelExperts):
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(mod, name)
                setattr(mod, name, nn.Parameter(_local(p.data).detach().clone(), requires_grad=p.requires_grad))


def apply_ep(model: nn.Module, ep_mesh, counter: ByteCounter | None = None) -> int:
    """Replace every routed-experts module of ``model`` (built on meta) by its expert-parallel
    share over ``ep_mesh``; returns how many were replaced (0: a dense model)."""
    n = 0
    for mod in list(model.modules()):
        experts = getattr(mod, "experts", None)
        if isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            mod.experts = ExpertParallelExperts(experts, ep_mesh, counter)
            n += 1
    return n
