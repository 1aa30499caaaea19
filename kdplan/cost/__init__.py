"""Cost model: prices any teacher/student layout (time, memory, bytes). Pure Python, no torch.

The contract with the solver and simulator is in kdplan/cost/api.py. Public API:

- ``price_student(problem, layout, *, compression, mode, placement, group, stage_layers,
  stage_groups) -> RolePrice``: training cost of the student per step;
- ``price_teacher(problem, layout, *, compression, group) -> RolePrice``: forward-only teacher;
- ``price_transfer(problem, candidate) -> TransferPrice``: teacher outputs to the student;
- ``evaluate(problem, candidate) -> Prediction``: the prediction block of design.md section 3
  (``predict``: the same without the baselines);
- ``colocated_teacher_s(student, teacher, virtual_stages) -> float``: what a colocated online
  teacher adds to the student's step (a disaggregated one costs ``teacher.steady_time_s``);
- ``price_generation(problem, layout, *, stage_layers, decode_batch) -> GenerationPrice``: the
  teacher generating the training text of sequence-level KD (kdplan.cost.generation);
- ``baselines(problem) -> Baselines``: single-GPU, naive-DP and mirror KD (cached per problem);
- formula helpers (``layer_flops``, ``allreduce_time``, ``activation_bytes_per_layer``, ...).

MFU convention: model FLOPs without recomputation (student forward + backward = 3x its forward,
plus the teacher's forward) / (step time * the sum of the dense peaks of the GPUs used, each at
its own type's peak on mixed clusters); recomputation is hardware work, not model work.

The loss over the vocabulary (CE, KD divergence, the teacher's top-k selection) is priced as
memory-bound fp32 passes over [tokens x V/tp] (compute.loss_passes / loss_time, at
Overheads.loss_bytes_per_s_fraction of the memory bandwidth) and shown as breakdown_s["loss"].
Prediction.comm_bytes_per_step counts device-to-device links only; host offload traffic stays
in bytes_per_step["offload"].

Layouts that cannot run (dp * micro_batch not dividing the global batch, tp not dividing the
heads, out of memory) come back with ``fits=False`` and a human ``why``; nothing is raised.
"""

from .api import Candidate, RolePrice, StageTime, TransferPrice
from .baselines import baselines
from .comm import (allgather_time, allreduce_time, link_time, p2p_time, place_group, reduce_scatter_time,
                   ring_allgather_time, ring_allreduce_time)
from .compose import colocated_teacher_s, compose, predict, price_student, price_teacher, price_transfer
from .compute import layer_time, loss_passes, loss_time, matmul_efficiency, matmul_time, optimizer_time, peak_flops
from .flops import (forward_flops, layer_flops, logits_flops, megatron_iteration_flops,
                    train_model_flops)
from .memory import activation_bytes_per_layer, in_flight, logits_bytes, model_state_bytes
from .generation import price_generation
from .prediction import evaluate
from .role import split_layers

__all__ = [
    "Candidate", "RolePrice", "StageTime", "TransferPrice",
    "price_student", "price_teacher", "price_transfer", "price_generation", "evaluate", "predict", "baselines", "compose",
    "colocated_teacher_s",
    "layer_flops", "logits_flops", "forward_flops", "train_model_flops", "megatron_iteration_flops",
    "allreduce_time", "allgather_time", "reduce_scatter_time", "ring_allreduce_time",
    "ring_allgather_time", "link_time", "p2p_time", "place_group",
    "activation_bytes_per_layer", "in_flight", "logits_bytes", "model_state_bytes",
    "layer_time", "loss_passes", "loss_time", "matmul_efficiency", "matmul_time", "optimizer_time", "peak_flops", "split_layers",
]
