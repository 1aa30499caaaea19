"""Fit the cost model's fitted constants to published runs, and judge them on runs left out.

``kdplan validate --fit`` and ``kdplan validate --leave-one-source-out`` (issue 13 item 4, issue 18
item 1). Every constant the cost model takes from measured runs rather than a datasheet is one
``Param`` in ``PARAMS``: where it lives (a GPU's efficiency curve, a cluster's runtime overheads or
its inter-node link), the rows it acts on, the value it takes with no data (``prior``, from the
schema default or the literature) and its bounds.

Objective: the sum over sources of the median |relative error| of iteration time, plus the median
|relative error| of memory where a source measured it (each median averaged with the mean of the
errors capped at 50%, which keeps the search from stalling on a median's flat steps), plus the share of its rows whose fits /
out-of-memory verdict is wrong (each source counts once, whatever its row count, so a 70-row sweep
does not outvote a 7-row table; a layout that ran and is predicted out of memory costs as much as
a 100% error on one of n rows, 1/n), plus, per sweep table of 3 rows or more, how far the
predicted order's Kendall tau falls short of 0.8 (issue 13's ranking bar), averaged over the
source's tables, weighted by ``TAU_WEIGHT``. Besides the published runs, one more
source: per-block forward + backward times measured on one H200 (``kdplan/data/h200_block_times.json``,
from benchmarks/results/gpu-check-2026-12-04), which constrain the H100-silicon curve and the
host's dispatch floor (compute.dispatch_floor_s) where the published H100 rows (large GEMMs only)
cannot. Plus the pull of the sourced priors (``_penalty``): a constant whose prior is counted or
measured (Param.spread) pays REG_WEIGHT per (ln(value/prior) / ln(spread))^2, so that it moves only
as far as the rows need and never to a value no physics supports (eager.elementwise_passes, counted
13, went to 1.6 under the coordinate search once the H100 knee was measured, which erased fms-fsdp's
measured eager-vs-compiled contrast).

Method (``fit``): a coordinate pattern search from the priors, and a second one from where the
same search lands on the development sources alone (``_search``): each parameter in turn tries one
step up and down (relative steps for log-scaled ones), keeps the best, and the steps halve after
each pass. Deterministic; only the rows a parameter acts on are re-priced when it moves. With the
pull of the priors, every search starts at the priors (the counted eager passes too). The pull acts
on the eager passes and the H100 dispatch floor only: on the merged code of session 8 a pull on the
GEMM ceilings, InternEvo's optimizer bytes and Jean Zay's link share too sent InternEvo left out to
12.1%; with the eager passes pulled alone it is 11.0% (left out: Megatron 2.7, BLOOM 5.7, fms 11.3,
OLMo 5.1, FlagPerf 8.2, EasyContext 11.9, H200 blocks 24.7), and with no pull the fit sends the
counted 13 passes to 3.1, erasing fms-fsdp's measured eager-vs-compiled contrast, for InternEvo 9.6%
(Megatron 3.8, EasyContext 15.8, H200 blocks 27.2): the same rows, a different path of the
coordinate search (kdplan validate --leave-one-source-out, 2026-12-05).

Joint optimisers were tried in its place (session 8) and reach a lower in-sample objective but
generalise worse, so they are not used: Hooke and Jeeves' pattern moves (the whole pass's change
repeated jointly, doubling while it improves) reached 0.620 against 0.624 for this search (both with a
pull on megatron.overlap_slowdown too, since dropped: it held Megatron's overlap at 1.17 where the rows
say 1.34, EasyContext 19.1% in-sample, 15.4% without), by moving the shared
A100 curve to a ceiling of 0.85, elementwise share 0.30 and attention at its bound 1.0, and left
InternEvo out at 12.7% (8.8% for this search), Megatron 2.9% (2.7%), EasyContext 18.4%; scipy's Powell did worse
on this step-function objective (medians, verdict shares): 0.654 bounded and 0.681 unbounded from the
priors (1,500 evaluations, 78 s), and bounded, its line search never evaluates the current point and
returned a point worse than its start.

Tried in session 9 (helper fmsie) and not kept: the ZeRO-3 / FSDP overlap slowdown charged only
while a collective runs (a layer of compute c beside a gather of g: c + g (1 - 1/slowdown) instead
of c * slowdown, role._zero3_gathers). fms-fsdp's A100 rows say so (FMS-T3-A100-01 computes 1.76 s
by the A100 curve, 1.80 s measured, its intra-node gathers ~1/25 of a layer: the flat 1.1x priced it
10% high) and fms went 8.1 / 11.3% -> 5.8 / 6.9% (in-sample / left out), but its H100 rows and
OLMo-core's lost the 10% the flat slowdown gave them and the fit lowered the shared H100 ceiling
(0.694 -> 0.654) instead: OLMo 5.1 / 5.1 -> 8.0 / 12.9%, MLPerf v3.1 6.6 -> 10.9%, v4.0 12.8 ->
16.7%, BLOOM left out 5.7 -> 8.8%, FlagPerf 8.2 -> 9.9% (EasyContext 11.9 -> 8.4%, H200 blocks left
out 24.7 -> 10.9%; kdplan validate --leave-one-source-out, 2026-12-05 06:08). A fitted slowdown
for the PyTorch FSDP clusters on top (prior 1.1) does not transfer: 1.155 on every source, 1.59
without fms (fms left out 13.0%), 1.39 without OLMo (OLMo left out 12.8%).

Tried in session 11 and not kept (`python benchmarks/fit_variants.py VARIANT [--loo]`, 2026-12-05, on schema
1.11's pricing: 1.12's shared host uplinks moved only EasyContext, 8.4 -> 7.9, which none of them fits; time
median |error| in-sample / left out, shipped: fms 6.4 / 7.4, H200 blocks 8.7 / 9.2, BLOOM 2.8 / 6.9, OLMo
4.6 / 5.6, InternEvo 2.5 / 7.4): every change that brings one more source under 5% in-sample sends another
over 10% left out.
- ``a100_ceiling=0.76`` (a100.max_fraction held, the rest refitted; the search from the priors stops at 0.68):
  objective 0.591 against 0.598, every fitted source under 5% in-sample (fms 4.4; its A100 rows run at
  68-74% HFU), but left out BLOOM 12.7, InternEvo 10.6, H200 blocks 10.4 and EasyContext 11.1 (its 64K
  data-parallel row); the knee moves to 49 GFLOP, far from any silicon measurement.
- ``fms_network`` (the achieved share of fms-fsdp's 400 Gb/s A100 network fitted: 0.71): FMS-T1-02, the one
  fms row whose backward waits on HSDP's inter-node all-reduce (13B, micro-batch 1), -14% -> -5%, the
  first table ranked as measured; fms 5.7 in-sample, but H200 blocks 11.3 left out (the refit moves the
  H100 curve).
- ``fsdp_stack_cost`` (a fixed cost per block per micro-batch for fms-fsdp and OLMo-core, 3.3 ms): objective
  0.518, H200 blocks 4.0 and OLMo 3.6 in-sample with the H100 knee at 27 GFLOP, but left out OLMo 20.1, fms
  14.9, H200 blocks 20.0 (only two sources identify it), MLPerf 9.4 / 8.5; over every PyTorch runtime
  (``fsdp_block_cost``) it also prices MLPerf v4.0's NeMo rows, 25%.
- ``h100_attention`` (h100.attention_fraction fitted, prior 1.0 spread 1.5; shipped 0.5, a pre-fit
  estimate): 0.81, H200 blocks 7.3 in-sample but 33.4 left out, OLMo 13.4 left out.
- ``megatron_block_cost``: fitted 0.2 ms per block, no gain (Megatron's shortfall scales with FLOPs).

A parameter that acts on no training row keeps its prior: leaving BLOOM out leaves the Jean Zay
Omni-Path efficiency and allocator reserve at their datasheet / schema defaults, which is what a
user of an unmeasured cluster would get.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..problem import Problem
from .validate import Case, RowResult, repeat_noise, run_case, table_taus

# The development sources (kdplan/data/published_runs_dev.csv): the second start of the search.
DEV_SOURCES = ("narayanan2021", "bloom_bigscience")
TAU_BAR = 0.8  # issue 13: ranking inside each sweep table
# Weight of the ranking shortfall: a quarter of an error term, so that a table whose order the
# inputs cannot explain (InternEvo's GPU-count sweeps, with no large-scale network term yet)
# does not bend the efficiency curves that every other source shares.
TAU_WEIGHT = 0.25
# A source with fewer priced rows is reported (priced with the constants fitted on the others, so
# its in-sample and left-out errors are the same number) but does not steer the fit: each source
# counts once in the objective, and the median of one or two rows is those rows (EasyContext's
# single 64K-token data-parallel row would otherwise weigh as much as Megatron's 22).
MIN_FIT_ROWS = 3
# The pull toward a sourced prior (Param.spread): this much objective per (ln(value/prior) / ln(spread))^2,
# i.e. a constant one spread away from its prior costs as much as 1% more median error on one source.
REG_WEIGHT = 0.01

GPU_A100 = ("a100-80g", "a100-40g", "a800-80g")  # one silicon (A800: A100 with capped NVLink)
GPU_H100 = ("h100-80g", "h800-80g", "h200")  # one silicon (H800: capped NVLink; H200: HBM3e)
BLOCK_SOURCE = "h200_blocks"  # the measured H200 blocks (block_cases below)


# Evidence beyond the fit, kept in the efficiency block's source on every write.
GPU_EVIDENCE = {
    "h200": ("the h200_blocks source is one real H200 (torch 2.11, bf16, CUDA events, one block fwd+bwd at "
             "seq 2048: benchmarks/results/gpu-check-2026-12-04/layer-times.json, copied to "
             "kdplan/data/h200_block_times.json)"),
}


@dataclass(frozen=True)
class Param:
    """One fitted constant. ``where`` is "gpu" (efficiency curve of the GPUs in ``scope``),
    "overheads" (runtime allowances of the cluster profiles in ``scope``, as borrowed by rows) or
    "inter_node" (the inter-node link efficiency of the clusters in ``scope``)."""

    name: str
    where: str
    key: str
    scope: tuple[str, ...]
    prior: float
    lo: float
    hi: float
    log: bool = False
    why: str = ""
    # How far physics lets a counted or measured prior wander, as a factor (>1; 0: the prior is only a
    # default, no pull): the fit pays REG_WEIGHT per (ln(value/prior) / ln(spread))^2.
    spread: float = 0.0
    # Sources that can see it: fitted only when one of them is among the training rows, else it
    # keeps its prior (still applied to every row in scope). Empty: any row in scope. Not a search
    # device: the physics of the rows (h100.op_dispatch_us: only the measured blocks run the
    # operators compute.block_ops counts; a published run's fused blocks issue others).
    sources: tuple[str, ...] = ()

    def acts_on(self, case: Case) -> bool:
        if case.problem is None:
            return False
        if self.where == "gpu":
            return any(g.node.gpu in self.scope for g in case.problem.cluster.groups)
        if self.where == "overheads":
            if self.key == "eager_elementwise_passes":  # priced on op-by-op blocks only (compute.layer_time)
                return case.runtime in self.scope and case.problem.cluster.overheads.block_ops == "eager"
            return case.runtime in self.scope
        return case.cluster_name in self.scope


PARAMS: tuple[Param, ...] = (
    # First: a runtime's own constant moves before the silicon's shared curve, so that the pattern
    # search does not bend the A100 curve (and every other A100 source) to one runtime's level.
    Param("internevo.layer_overhead_s", "overheads", "layer_overhead_s", ("internevo-a800",), 0.0, 0.0, 0.01,
          why="fixed cost per block per micro-batch of the InternEvo runtime (its single-node rows run ~7% "
              "below the A100 curve the Megatron rows fit): InternEvo throughput rows"),
    Param("a100.max_fraction", "gpu", "max_fraction", GPU_A100, 0.75, 0.4, 0.95,
          why="ceiling of a large bf16 GEMM as a share of dense peak"),
    Param("a100.half_saturation_gflop", "gpu", "half_saturation_gflop", GPU_A100, 20.0, 1.0, 400.0, log=True,
          why="GEMM size at half the ceiling"),
    Param("a100.elementwise_bandwidth_fraction", "gpu", "elementwise_bandwidth_fraction", GPU_A100, 0.8, 0.2, 1.0,
          why="share of the memory bandwidth the fused norms, activation, residual adds and rotary reach (their "
              "bytes counted: compute.fused_elementwise_elements; prior: fused bandwidth-bound kernels at ~80% of HBM)"),
    Param("h100.elementwise_bandwidth_fraction", "gpu", "elementwise_bandwidth_fraction", GPU_H100, 0.8, 0.2, 1.0,
          why="as a100, on H100/H800/H200 rows"),
    # Sourced prior, pulled toward: FlashAttention-2 runs a causal core at 50-73% of A100 peak on its
    # real FLOPs (Dao 2023, abstract), i.e. 1.0-1.46 in kdplan's full-mask convention (half those FLOPs
    # are masked), capped at the bound 1.0; the 512K/700K EasyContext rows, 95% attention core, match
    # 1.0 (compute.py). Unpulled, the short-sequence sources used the core as a sink: 0.63-1.0 from fit
    # to fit, EasyContext (never fitted: warm-up rows) 8% to 27% off with it.
    Param("a100.attention_fraction", "gpu", "attention_fraction", GPU_A100, 1.0, 0.1, 1.0,
          why="attention-core kernels' efficiency relative to the GEMM curve (full-mask FLOPs; prior: "
              "FlashAttention-2's causal 50-73% of A100 peak, Dao 2023)", spread=1.5),
    Param("h100.max_fraction", "gpu", "max_fraction", GPU_H100, 0.75, 0.3, 0.95,
          why="as a100, fitted on H100/H800 rows (fms-fsdp, OLMo-core, FlagPerf) instead of scaled by peak"),
    # The knee is what the H200 blocks fit and the published H100 rows do not (blocks left out: 24.7%).
    # Without the blocks the fit puts it at 118 GFLOP (ceiling 0.76), which misses the micro-batch-1
    # blocks by +41..+52% (gpt-13b, llama-3-8b: measured as fast per token at 2,048 tokens as at
    # 16,384, no knee); the rows that pull it up are runs predicted too fast at 53 GFLOP whose slowness
    # is their runtime's (FLAG-BC2-13B -41/-26%, FLAG-L2-7B-DS -23%, FLAG-GLM3 -19% (DeepSpeed + HF
    # eager), FMS-T2-H100-01/02 -17/-14% (eager), OLMOC-07 -13%). Tried and not used (session 9,
    # blocks left out): a pull to the prior (spread 2: 104 GFLOP, 24.8%; spread 1.5: 93, 20.9%); one
    # knee for A100 and H100 scaled by peak (29 GFLOP A100-equivalent, blocks 20.9%, and it bent the
    # A100 curve: Megatron 3.2%, EasyContext 21.2% in that fit); the H200's elementwise share scaled by
    # HBM bandwidth (3.35/4.8 TB/s: 23.9%).
    Param("h100.half_saturation_gflop", "gpu", "half_saturation_gflop", GPU_H100, 63.0, 1.0, 1000.0, log=True,
          why="as a100, on H100/H800 rows"),
    # Fitted only on the measured blocks, the one source whose operators compute.block_ops counts (the
    # executor's eager blocks): a published run's fused blocks issue other operators, so the floor would
    # stand in there for whatever else slows a row (left to its prior 10 us, FlagPerf's Llama-2-70B tp8
    # row pulled it to 28 us with the blocks left out, and the gpt-1.3b block 77% off).
    Param("h100.op_dispatch_us", "gpu", "op_dispatch_us", GPU_H100, 10.0, 1.0, 100.0, log=True,
          why="host time to issue one eager operator: a block's pass takes at least its operators times this "
              "(prior: PyTorch eager dispatch, several to ~10 us per operator); fitted on the H200 blocks",
          sources=(BLOCK_SOURCE,), spread=2.0),
    Param("megatron.overlap_slowdown", "overheads", "overlap_slowdown", ("selene-a100-80g",), 1.1, 1.0, 2.0,
          why="compute slowed by overlapped collectives (Galvatron 1.1-1.3): Megatron-LM ZeRO-3 rows"),
    Param("megatron.fragmentation_fraction", "overheads", "fragmentation_fraction", ("selene-a100-80g",),
          0.05, 0.0, 0.6, why="allocator reserve over the bytes allocated every step: Megatron-family memory rows (FlagPerf)"),
    Param("deepspeed.fragmentation_fraction", "overheads", "fragmentation_fraction",
          ("jean-zay-a100-80g", "deepspeed-hf-a100"),
          0.05, 0.0, 0.6, why="allocator reserve over the bytes allocated every step: Megatron-DeepSpeed / DeepSpeed memory rows"),
    # One runtime, one constant: Megatron-DeepSpeed (BLOOM on Jean Zay) and DeepSpeed ZeRO driving Hugging
    # Face code (FlagPerf) share DeepSpeed's engine, whose hooks and launches this prices. Fitted apart
    # (shipped in session 9: 0.0066 / 0.0033 s), BLOOM left out lost its own value and was 11.1% off
    # (session 10, kdplan validate --leave-one-source-out with the elementwise bytes and overlap scope).
    Param("deepspeed.layer_overhead_s", "overheads", "layer_overhead_s", ("jean-zay-a100-80g", "deepspeed-hf-a100"),
          0.0, 0.0, 0.03,
          why="fixed cost per block per micro-batch (kernel launches, hooks) of the DeepSpeed runtime: BLOOM's "
              "Megatron-DeepSpeed and FlagPerf's DeepSpeed + Hugging Face rows"),
    Param("paddle.layer_overhead_s", "overheads", "layer_overhead_s", ("paddle-a100",), 0.0, 0.0, 0.03,
          why="fixed cost per block per micro-batch of PaddlePaddle 2.5's dygraph (FlagPerf Paddle rows)"),
    Param("paddle.framework_memory_gib", "overheads", "framework_memory_gib", ("paddle-a100",), 2.0, 0.5, 16.0,
          why="CUDA context, NCCL buffers and allocator reserve of PaddlePaddle 2.5 as nvidia-smi shows them "
              "(FlagPerf Paddle memory rows; prior: the schema's 2 GiB)"),
    Param("internevo.optimizer_step_bytes", "overheads", "optimizer_step_bytes", ("internevo-a800",), 10.0, 0.0, 32.0,
          why="bytes per updated parameter InternEvo's optimizer step allocates (fp32 gradient copy, "
              "flattened copy, AdamW temporaries; prior counted from its source): InternEvo memory rows"),
    # InternEvo's RoCE share is not fitted: the fit trades it against the shared A100 curve (0.57 to 1.0 in
    # successive fits, session 6), and at 0.57 its zero1=8 rows grow 10% from 16 to 512 GPUs where they were
    # measured flat (tests/test_scale.py); it keeps the InfiniBand presets' 0.85 (profiles/clusters/internevo-a800.yaml).
    Param("eager.elementwise_passes", "overheads", "eager_elementwise_passes",
          ("dgx-a100-80g", "dgx-a100-40g", "dgx-a800", "dgx-h100", "dgx-h200", "dgx-h800"), 13.0, 0.0, 200.0,
          why="memory-bound passes over a block's b*s*(h+f) activations that op-by-op PyTorch blocks make beyond "
              "fused ones (block_ops eager): fms-fsdp's tables without torch.compile. Prior counted from a Llama "
              "block run op by op, in 16-bit passes beyond a fused kernel's: each fp32 RMSNorm (cast, square, "
              "mean, multiply, cast back, weight) ~16 over h, twice; rotary on q and k ~12 over h; SwiGLU's "
              "separate silu and product 2 over f: (44h + 2f) / (h + f) ~ 13 at f = 2.7h", spread=2.0),
    Param("jean-zay.inter_node_efficiency", "inter_node", "efficiency", ("jean-zay-a100-80g",), 0.85, 0.05, 1.0,
          log=True, why="achieved share of Jean Zay's Omni-Path rate (prior: the InfiniBand presets' 0.85)"),
)


def apply(case: Case, values: dict[str, float], params: tuple[Param, ...] = PARAMS) -> Case:
    """The case with its cluster carrying ``values`` (the parameters that act on it)."""
    acting = [p for p in params if p.name in values and p.acts_on(case)]
    if not acting:
        return case
    cl = case.problem.cluster
    gpus, ov, groups = dict(cl.gpus), cl.overheads, list(cl.groups)
    for p in acting:
        v = values[p.name]
        if p.where == "gpu":
            for name, g in gpus.items():
                if name in p.scope:
                    gpus[name] = g.model_copy(update={"efficiency": g.efficiency.model_copy(update={p.key: v})})
        elif p.where == "overheads":
            ov = ov.model_copy(update={p.key: v})
        else:
            groups = [g.model_copy(update={"node": g.node.model_copy(update={
                "inter_node": g.node.inter_node.model_copy(update={p.key: v})})}) for g in groups]
    cluster = cl.model_copy(update={"gpus": gpus, "overheads": ov, "groups": groups})
    pr = case.problem
    problem = Problem(job=pr.job, teacher=pr.teacher, student=pr.student, cluster=cluster, pins=pr.pins)
    return dataclasses.replace(case, problem=problem)


def _centre(errors: list[float], smooth: bool) -> float | None:
    """The median of |errors|; ``smooth``: the mean of the median and of the mean with each error
    capped at 50% (a median alone is flat between rows, which stalls a search)."""
    if not errors:
        return None
    med = statistics.median(errors)
    return (med + statistics.fmean(min(e, 0.5) for e in errors)) / 2 if smooth else med


def source_errors(results: list[RowResult], smooth: bool = False) -> dict[str, tuple[float | None, float | None]]:
    """Per source: (median |time error|, median |memory error|) over its priced, non-OOM rows
    (``smooth``: the fit's smoothed centre, see _centre)."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for src in dict.fromkeys(r.source for r in results):
        rs = [r for r in results if r.source == src and not r.oom]
        te = [abs(r.time_error) for r in rs if r.time_error is not None]
        me = [abs(r.memory_error) for r in rs if r.memory_error is not None]
        out[src] = (_centre(te, smooth), _centre(me, smooth))
    return out


def objective(results: list[RowResult]) -> float:
    """Sum over sources of the median |time error|, the median |memory error| and the share of
    wrong fit verdicts (module doc). A row the model refuses to price counts as a 100% error."""
    total = 0.0
    for t, m in source_errors(results, smooth=True).values():
        total += (t if t is not None else 0.0) + (m if m is not None else 0.0)
    noise = repeat_noise(results)
    for src in dict.fromkeys(r.source for r in results):
        rs = [r for r in results if r.source == src and not r.skip]
        known = [r for r in rs if r.fit_known]  # a row without its GPU's memory size has no verdict
        total += sum(not r.fit_agrees for r in known) / max(1, len(known))
        short = [max(0.0, TAU_BAR - tau) if not math.isnan(tau) else 0.0
                 for tau in table_taus(rs, noise.get(src, 0.0), min_rows=3).values()]
        total += TAU_WEIGHT * statistics.fmean(short) if short else 0.0
    total += sum(1.0 for r in results if r.predicted_time_s is None and r.measured_time_s and not r.skip)
    return total


class _Pricer:
    """Row results memoised on the values of the parameters acting on each row."""

    def __init__(self, cases: list[Case], params: tuple[Param, ...]):
        # rows timed over a run's first steps only (validate.WARM_UP) are reported, not fitted; so
        # are rows trained in fp8 (kdplan.cost.fp8): their GEMM speed rests on the profiles'
        # low_precision_derating, an unfitted estimate, which the shared curves must not absorb
        priced = [c for c in cases if not c.skip and c.problem is not None and not c.warm_up
                  and (c.layout is None or c.layout.train_precision == "job")]
        rows: dict[str, int] = {}
        for c in priced:
            rows[c.row["source_id"]] = rows.get(c.row["source_id"], 0) + 1
        self.cases = [c for c in priced if rows[c.row["source_id"]] >= MIN_FIT_ROWS]
        self.params = params
        self.acting = [tuple(p.name for p in params if p.acts_on(c)) for c in self.cases]
        self.memo: dict[tuple, RowResult] = {}

    def results(self, values: dict[str, float]) -> list[RowResult]:
        out = []
        for i, (c, names) in enumerate(zip(self.cases, self.acting)):
            key = (i,) + tuple(values[n] for n in names)
            r = self.memo.get(key)
            if r is None:
                r = self.memo[key] = _price(apply(c, values, self.params))
            out.append(r)
        return out


@dataclass
class FitResult:
    values: dict[str, float]
    objective: float
    sources: list[str]
    rows: int
    untouched: list[str]  # parameters no training row acts on: left at their prior


def fit(cases: list[Case], params: tuple[Param, ...] = PARAMS, *, rounds: int = 6) -> FitResult:
    """Fit ``params`` to the priced rows of ``cases`` (module docstring), on the objective plus the
    pull of the sourced priors, from two starts; the lower objective wins: the priors, and the
    values the same search reaches on the development sources alone (DEV_SOURCES, the runs the cost
    model was built on; the source left out of a leave-one-source-out fit is not among ``cases``).
    One start is not enough where a runtime's own constant and a shared curve trade off: from the
    priors, InternEvo's rows sit at their level only while the A100 attention efficiency stays at
    its slow prior, so one step of either alone makes the objective worse."""
    pricer = _Pricer(cases, params)
    seen = {c.row["source_id"] for c in pricer.cases}
    live = [p for p in params if any(p.name in names for names in pricer.acting)
            and (not p.sources or seen & set(p.sources))]
    # A parameter no row acts on (or none of whose sources is among the rows) is never moved: it
    # keeps its prior.
    priors = {p.name: p.prior for p in params}
    starts = [priors]
    dev = [c for c in pricer.cases if c.row["source_id"] in DEV_SOURCES]
    if dev and len(dev) < len(pricer.cases):
        dev_pricer = _Pricer(dev, params)
        dev_live = [p for p in live if any(p.name in names for names in dev_pricer.acting)]
        starts.append(_search(dev_pricer, dev_live, priors, rounds)[1])
    best, values = min((_search(pricer, live, start, rounds) for start in starts), key=lambda r: r[0])
    srcs = sorted({c.row["source_id"] for c in pricer.cases})
    return FitResult(values=values, objective=best, sources=srcs, rows=len(pricer.cases),
                     untouched=[p.name for p in params if p not in live])


def _penalty(values: dict[str, float], live: list[Param]) -> float:
    """The pull toward the sourced priors (Param.spread): REG_WEIGHT per (ln(value/prior) / ln(spread))^2."""
    total = 0.0
    for p in live:
        if p.spread > 1.0 and p.prior > 0:
            # a value at 0 (a linear parameter's lower bound) is priced as a thousandth of the prior,
            # not let off: a counted 13 passes fitted to 0 is the value no physics supports
            v = max(values[p.name], p.prior / 1000)
            total += REG_WEIGHT * (math.log(v / p.prior) / math.log(p.spread)) ** 2
    return total


def _search(pricer: "_Pricer", live: list[Param], values: dict[str, float],
            rounds: int) -> tuple[float, dict[str, float]]:
    """The coordinate pattern search from ``values``: (objective + prior penalty, values). Each round
    every live parameter in turn tries one step up and down (relative steps for log-scaled ones) and
    keeps the best; the steps halve after each round."""

    def f(vals: dict[str, float]) -> float:
        return objective(pricer.results(vals)) + _penalty(vals, live)

    best = f(values)
    steps = {p.name: (0.5 if p.log else (p.hi - p.lo) / 4) for p in live}
    for _ in range(rounds):
        for p in live:
            step = steps[p.name]
            cur = values[p.name]
            tries = (cur * math.exp(step), cur * math.exp(-step)) if p.log else (cur + step, cur - step)
            for v in tries:
                v = round(min(p.hi, max(p.lo, v)), 6)
                if v == cur:
                    continue
                trial = {**values, p.name: v}
                obj = f(trial)
                if obj < best - 1e-9:
                    best, values = obj, trial
            steps[p.name] = step / 2
    return best, values


def _price(case: Case) -> RowResult:
    return price_block(case) if isinstance(case, BlockCase) else run_case(case)


def price_with(cases: list[Case], values: dict[str, float], params: tuple[Param, ...] = PARAMS) -> list[RowResult]:
    """Every case (skipped ones too, for the report) priced with the fitted ``values``."""
    return [_price(apply(c, values, params)) if not c.skip else run_case(c) for c in cases]


@dataclass
class LeftOut:
    source: str
    in_sample: tuple[float | None, float | None]  # (time, memory) median |error|, fit on every source
    left_out: tuple[float | None, float | None]  # the same, fit on every other source
    fit: FitResult


def leave_one_source_out(cases: list[Case], params: tuple[Param, ...] = PARAMS,
                         sources: list[str] | None = None) -> tuple[FitResult, list[LeftOut]]:
    """Fit on every source, then once per source on all the others; each source's error in-sample
    and when left out."""
    full = fit(cases, params)
    inside = source_errors(price_with(cases, full.values, params))
    priced = [s for s in dict.fromkeys(c.row["source_id"] for c in cases)
              if any(not c.skip for c in cases if c.row["source_id"] == s)]
    out = []
    for src in sources or priced:
        train = [c for c in cases if c.row["source_id"] != src]
        held = [c for c in cases if c.row["source_id"] == src]
        f = fit(train, params)
        left = source_errors(price_with(held, f.values, params)).get(src, (None, None))
        out.append(LeftOut(src, inside.get(src, (None, None)), left, f))
    return full, out


# ---- writing the fitted values into the profiles ---------------------------------------------

def _yaml_files(p: Param, root: Path) -> list[Path]:
    sub = "hardware" if p.where == "gpu" else "clusters"
    return [root / sub / f"{name}.yaml" for name in p.scope]


def _set_line(lines: list[str], key: str, value: str, comment: str, *, after: str | None = None,
              insert_under: str | None = None) -> None:
    """Replace ``key: ...`` (the first after the line ``after:`` when given) keeping its indent;
    insert it under ``insert_under:`` when the key is absent."""
    start = 0
    if after is not None:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == f"{after}:")
    pat = re.compile(rf"^(\s*){re.escape(key)}:\s")
    for i in range(start, len(lines)):
        m = pat.match(lines[i])
        if m:
            lines[i] = f"{m.group(1)}{key}: {value}   # {comment}"
            return
    if insert_under is None:
        raise ValueError(f"{key} not found")
    j = next(i for i, ln in enumerate(lines) if ln.strip() == f"{insert_under}:")
    indent = "  "
    lines.insert(j + 1, f"{indent}{key}: {value}   # {comment}")


def write_profiles(result: FitResult, root: Path, params: tuple[Param, ...] = PARAMS, *,
                   command: str = "kdplan validate --fit --write", date: str = "") -> list[Path]:
    """Write the fitted values into the profile YAMLs under ``root`` (profiles/), each line with
    its provenance; GPU efficiency blocks get their ``source:`` rewritten. Returns the files."""
    note = (f"fitted by `{command}`{' on ' + date if date else ''} to {result.rows} rows of "
            f"{', '.join(result.sources)} (objective {result.objective:.4f}: sum over sources of median "
            f"|time error| + median |memory error| + share of wrong fit verdicts + ranking shortfall)")
    touched: dict[Path, list[str]] = {}
    for p in params:
        if p.name in result.untouched:
            continue
        v = result.values[p.name]
        text = f"{v:.4g}"
        for path in _yaml_files(p, root):
            lines = touched.setdefault(path, path.read_text().splitlines())
            if p.where == "gpu":
                _set_line(lines, p.key, text, p.name)
            elif p.where == "overheads":
                _set_line(lines, p.key, text, f"{p.name}: {p.why}", insert_under="overheads")
            else:
                _set_line(lines, p.key, text, p.name, after="inter_node")
    for path, lines in touched.items():
        if path.parent.name == "hardware":
            for i, ln in enumerate(lines):
                if ln.strip().startswith("source:") and ln.startswith("    source:"):  # the efficiency block's
                    extra = GPU_EVIDENCE.get(path.stem)
                    lines[i] = f'    source: "{note}' + (f"; {extra}" if extra else "") + '"'
                    break
        else:
            lines = [ln for ln in lines]
            lines.append(f"# {note}") if not any(ln.startswith("# fitted by") for ln in lines) else None
            lines = [f"# {note}" if ln.startswith("# fitted by") else ln for ln in lines]
        path.write_text("\n".join(lines) + "\n")
    return list(touched)


# ---- per-block GPU timings: H100-silicon evidence beside the published runs ----------------------

BLOCK_TIMES = Path(__file__).resolve().parent.parent / "data" / "h200_block_times.json"


@dataclass
class BlockCase(Case):
    """One measured transformer block (forward + backward, bf16) on one GPU: priced as the cost
    model's block time, layer_time()'s forward_s + backward_s (each the device's work or the host's
    dispatch of the pass's operators, whichever is longer)."""

    model_name: str = ""
    micro_batch: int = 1
    seq_len: int = 2048


def block_cases(path: Path = BLOCK_TIMES) -> list[BlockCase]:
    """The measured blocks of ``path`` (kdplan/data/h200_block_times.json) as fit cases."""
    import json

    from ..models import preset
    from ..profiles import load_cluster
    from ..schema.job import JobSpec

    data = json.loads(path.read_text())
    cluster = load_cluster(f"dgx-{data['gpu']}", 1)
    out = []
    for i, b in enumerate(data["blocks"]):
        model = preset(b["model"]).model_copy(update={"gated_mlp": b["gated_mlp_preset"]})
        job = JobSpec(teacher=None, student=b["model"], cluster=cluster.name, gpus=1, seq_len=b["seq_len"],
                      global_batch=b["micro_batch"])
        row = {"row_id": f"H200-BLOCK-{i + 1:02d}", "source_id": BLOCK_SOURCE,
               "source_location": f"{b['model']} block, micro-batch {b['micro_batch']}"}
        out.append(BlockCase(row=row, problem=Problem(job=job, teacher=None, student=model, cluster=cluster),
                             measured_time_s=b["bf16 fwd+bwd s"], model_name=b["model"],
                             micro_batch=b["micro_batch"], seq_len=b["seq_len"]))
    return out


def price_block(case: BlockCase) -> RowResult:
    from .compute import layer_time

    gpu = case.problem.cluster.gpu_of_group(0)
    lt = layer_time(case.problem.student, gpu, "bf16", b=case.micro_batch, s=case.seq_len, tp=1, fused_attention=True)
    return RowResult(row_id=case.row["row_id"], source=BLOCK_SOURCE, table="per-block timings",
                     measured_time_s=case.measured_time_s, predicted_time_s=lt.forward_s + lt.backward_s,
                     measured_memory_gib=None, predicted_memory_gib=None, oom=False, predicted_fits=True,
                     layout=f"{case.model_name} mb{case.micro_batch} s{case.seq_len}")
