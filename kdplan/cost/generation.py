"""Sequence-level KD: what it costs the teacher to generate the training text.

Sequence-level KD (Kim & Rush 2016) distils through text: the teacher generates continuations of
prompts once, offline, and the student trains on them with plain cross-entropy in its own
tokenizer. It is how the public DeepSeek-R1 -> Qwen/Llama distillations were made (DeepSeek-R1
report, section 2.4: about 800k teacher-generated samples, the students fine-tuned on them), and
the only KD kdplan plans when teacher and student have different tokenizers (their ids mean
different tokens, so their logits cannot be compared).

The teacher runs once over the job's tokens (like the offline cache: one pass), writing token ids
(``TOKEN_ID_BYTES`` per token); the student's step is a plain cross-entropy step (no teacher
outputs to read, no KD loss). This module prices the generation on one teacher layout; the
search (kdplan.search.sequence) picks the layout, kdplan.cost.job adds the pass to the job.

Per training sequence of s = seq_len tokens and prompt ratio r (job kd.prompt_ratio: prompt
tokens per generated token): a prompt of P = s r / (1 + r) tokens and G = s / (1 + r) generated.

- Prefill (per prompt token, one replica of tp x pp GPUs): the forward's active FLOPs (every
  block at the prompt's length, the output projection of the last token only) / (tp pp x dense
  peak x the profile's achieved fraction ``efficiency.max_fraction``): compute bound, large
  GEMMs; the pipeline fill is amortised over many prompts.
- Decode (per generated token): B sequences in flight per replica, split into pp micro-batches
  of b = B / pp that rotate through the pipeline stages; one *round* advances every sequence by
  one token. Per micro-batch a stage (the fullest, f = its layers / L) takes
      max(bytes / (HBM bandwidth x DECODE_HBM_FRACTION), FLOPs / (peak x max_fraction))
  plus its tensor-parallel all-reduces (two per block of b x h activations) and its pipeline send,
  where bytes = the stage's weights it reads (non-expert weights always; an MoE layer's routed
  experts as many as b tokens touch, ``touched_experts``) / tp, plus the KV cache of b sequences
  at the mean context (P + G/2) for its blocks / the KV split; FLOPs = b x (2 x active block
  parameters x f + the output projection + the attention over the context) / tp. A round is pp
  such slots; the time per generated token is round / B.
- B: the most sequences whose KV cache (at the full sequence length) fits beside the weights,
  the runtime and the decode workspace, up to ``MAX_DECODE_BATCH``; a multiple of pp.
- Memory: weights of the fullest stage (the embedding and the output projection both charged to
  it: exact for pp = 1, an upper bound otherwise) / tp, KV cache, logits workspace, runtime and
  fragmentation as the profile states them.

Assumptions, each named:
- ``MAX_DECODE_BATCH`` = 256 sequences in flight per replica: vLLM's default ``max_num_seqs``
  (vllm EngineArgs), the serving engine such generations run on.
- ``DECODE_HBM_FRACTION`` = 0.7 of the datasheet HBM bandwidth reached by decode's weight- and
  KV-streaming kernels: an assumption, not measured or calibrated here (no decode measurement
  exists in this repository yet).
- Routing is uniform and independent per token (``touched_experts``): b tokens touch
  E (1 - (1 - k/E)^b) of E experts. Real routers are imbalanced and touch fewer: an upper bound
  on the bytes, so on the time.
- KV cache split over tp: grouped-query attention by min(tp, KV heads) (heads beyond that are
  replicated); multi-head latent attention (DeepSeek-V3) not at all: its latent is shared by the
  heads, so every tp rank holds it (what vLLM/SGLang do without data-parallel attention).
- Sampling, detokenization and retokenization for the student are not priced (CPU work beside
  the GPUs); nor is prefix caching (each prompt is prefilled once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..problem import Problem
from ..schema.layers import split_layers
from ..schema.model import ModelSpec
from ..schema.plan import GenerationCost, Layout
from . import comm
from .compute import PRECISION_BYTES, peak_flops
from .flops import layer_flops

GIB = 2**30
TOKEN_ID_BYTES = 4
"""Bytes stored per generated token: one int32 id."""
MAX_DECODE_BATCH = 256
"""Sequences in flight per replica at most (vLLM's default max_num_seqs; module docstring)."""
DECODE_HBM_FRACTION = 0.7
"""Achieved fraction of HBM bandwidth when decoding (an assumption; module docstring)."""


def split_tokens(seq_len: int, prompt_ratio: float) -> tuple[float, float]:
    """(prompt, generated) tokens of one training sequence of ``seq_len`` tokens."""
    gen = seq_len / (1.0 + prompt_ratio)
    return seq_len - gen, gen


def touched_experts(model: ModelSpec, tokens: float) -> float:
    """Expected routed experts per MoE block that ``tokens`` tokens run through, under uniform,
    independent routing: E (1 - (1 - k/E)^tokens) (top-k of E); 0 for a dense model."""
    moe = model.moe
    if moe is None:
        return 0.0
    E, k = moe.num_experts, moe.experts_per_token
    return E * (1.0 - (1.0 - k / E) ** tokens)


def kv_bytes_per_token_layer(model: ModelSpec, q: int) -> float:
    """KV-cache bytes of one token in one block: 2 g d (grouped-query), or MLA's latent plus its
    shared rotary key (kv_lora_rank + qk_rope_head_dim)."""
    if model.mla is not None:
        return (model.mla.kv_lora_rank + model.mla.qk_rope_head_dim) * q
    return 2.0 * model.num_kv_heads * model.head_dim * q


def kv_split(model: ModelSpec, tp: int) -> int:
    """How many ways tensor parallelism splits the KV cache (module docstring)."""
    return 1 if model.mla is not None else min(tp, model.num_kv_heads)


def effective_context(model: ModelSpec, ctx: float) -> float:
    """Tokens a position attends to, averaged over the blocks (sliding-window blocks see at most
    their window)."""
    if model.sliding_window is None:
        return ctx
    slide = model.sliding_layers
    return ((model.num_layers - slide) * ctx + slide * min(ctx, model.sliding_window)) / model.num_layers


def _routed_params(model: ModelSpec) -> float:
    moe = model.moe
    return 0.0 if moe is None else model.moe_layers * moe.num_experts * model.expert_params()


def _head_params(model: ModelSpec) -> float:
    """The output projection and the final norm (read for every decoded token)."""
    return model.vocab_size * model.hidden_size + model.hidden_size


@dataclass
class GenerationPrice:
    """One teacher layout's generation price (``cost`` for the plan), or why it cannot run."""

    fits: bool
    why: str = ""
    cost: GenerationCost | None = None


def price_generation(problem: Problem, layout: Layout, *, stage_layers: tuple[int, ...] | None = None,
                     group: int = 0, decode_batch: int | None = None) -> GenerationPrice:
    """Price the teacher generating the job's training text on ``layout`` (tp x pp x dp of the
    cluster's GPUs, bf16 weights resident; ``stage_layers``: layers per stage, even when None).
    ``decode_batch``: sequences in flight per replica (None: the most that fit, up to
    MAX_DECODE_BATCH). The module docstring states every formula and assumption."""
    m, job, cl = problem.teacher, problem.job, problem.cluster
    gpu, node, ov = cl.gpu_of_group(group), cl.groups[group].node, cl.overheads
    q = PRECISION_BYTES[job.precision]
    tp, pp, L = layout.tp, layout.pp, m.num_layers
    counts = tuple(stage_layers) if stage_layers else split_layers(L, pp)
    if sum(counts) != L or len(counts) != pp:
        return GenerationPrice(False, f"stage layers {counts} do not split {L} layers into {pp} stages")
    f = max(counts) / L
    s = job.seq_len
    P, G = split_tokens(s, job.kd.prompt_ratio)
    ctx = effective_context(m, P + G / 2.0)
    kv_tok = kv_bytes_per_token_layer(m, q)
    kvs = kv_split(m, tp)
    routed = _routed_params(m)
    blocks = m.num_layers * m.layer_params()
    nonrouted_blocks = blocks - routed
    head = _head_params(m)
    embed_in = m.embedding_params() - m.vocab_size * m.hidden_size  # the input table unless tied (+ positions)

    # Memory of the fullest stage, and the sequences in flight that fit.
    weights = q * (blocks * f + embed_in + head) / tp
    kv_per_seq = s * kv_tok * L * f / kvs  # the full sequence's cache, at its peak
    limit = gpu.memory_gib * GIB

    def memory(B: int) -> float:
        b = B / pp
        logits = b * m.vocab_size / tp * (q + 4)  # one position per sequence: 16-bit logits + fp32 softmax
        allocated = weights + B * kv_per_seq + logits
        return allocated * (1 + ov.fragmentation_fraction) + ov.framework_memory_gib * GIB

    if decode_batch is None:
        B = (MAX_DECODE_BATCH // pp) * pp
        while B >= pp and memory(B) > limit:
            B -= pp
    else:
        B = decode_batch
    if B < pp or B % pp:
        need = memory(pp) / GIB
        return GenerationPrice(False, f"teacher weights {weights / GIB:.1f} GiB per GPU at tp={tp} pp={pp} leave no "
                               f"room for one sequence per pipeline micro-batch ({need:.1f} GiB needed, "
                               f"{gpu.memory_gib:g} GiB per GPU)" if B < pp else
                               f"decode batch {B} is not a multiple of pp={pp}")
    if memory(B) > limit:
        return GenerationPrice(False, f"{B} sequences in flight need {memory(B) / GIB:.1f} GiB per GPU "
                               f"> {gpu.memory_gib:g} GiB")
    b = B // pp

    # Prefill: compute bound, per prompt token on one replica.
    peak = peak_flops(gpu, job.precision) * gpu.efficiency.max_fraction
    prefill_s = 0.0
    if P >= 1:
        n = max(1, round(P))
        flops = L * layer_flops(m, b=1, s=n).total + 2.0 * m.hidden_size * m.vocab_size
        prefill_s = flops / n / (tp * pp * peak)

    # Decode: one micro-batch of b sequences through the fullest stage.
    read = q * ((nonrouted_blocks + (routed * touched_experts(m, b) / m.moe.num_experts if m.moe else 0.0)) * f
                + head) / tp
    read += b * ctx * kv_tok * L * f / kvs
    d_v = m.mla.v_head_dim if m.mla is not None else m.head_dim
    attn = 2.0 * m.num_heads * (m.head_dim + d_v) * ctx  # QK^T and AV over the context, per block
    active_blocks = m.num_layers * m.active_layer_params()
    flops = b * (2.0 * active_blocks * f + attn * L * f + 2.0 * m.hidden_size * m.vocab_size) / tp
    t_mem = read / (gpu.memory_bandwidth_gb_per_s * 1e9 * DECODE_HBM_FRACTION)
    t_flop = flops / peak
    link = node.intra_node if tp <= node.gpus_per_node else node.inter_node
    t_tp = 2 * L * f * comm.ring_allreduce_time(link, b * m.hidden_size * q, tp)
    t_pp = 0.0
    if pp > 1:
        pp_link = node.intra_node if tp * pp <= node.gpus_per_node else node.inter_node
        t_pp = comm.link_time(pp_link, b * m.hidden_size * q, op="send_recv")
    round_s = pp * (max(t_mem, t_flop) + t_tp + t_pp)
    decode_s = round_s / B

    per_sequence = P * prefill_s + G * decode_s  # one replica
    pass_s = job.global_batch * per_sequence / layout.dp
    if not math.isfinite(pass_s):
        return GenerationPrice(False, "generation time is not finite")
    return GenerationPrice(True, cost=GenerationCost(
        teacher_pass_s_per_step=pass_s, prefill_s_per_token=prefill_s, decode_s_per_token=decode_s,
        decode_round_s=round_s, decode_bound="memory" if t_mem >= t_flop else "compute", decode_batch=B,
        prompt_ratio=job.kd.prompt_ratio, mean_context_tokens=ctx, kv_cache_bytes_per_token=kv_tok * L,
        memory_per_gpu_gib=memory(B) / GIB, storage_bytes_per_token=float(TOKEN_ID_BYTES)))
