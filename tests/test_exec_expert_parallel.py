"""Expert parallelism in the executor (teacher.layout.ep, issue 19): a tiny MoE teacher's experts
split over 2 gloo processes, tokens dispatched and combined by all_to_all_single, against the
one-process model; and the executor's launch honouring the plan field end to end."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import init_gloo, spawn_gloo  # noqa: E402
from executor.mesh import close_process_group  # noqa: E402
from kdplan.models import from_hf_config  # noqa: E402

pytestmark = pytest.mark.executor

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
CONFIGS = {
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, norm_topk_prob=True),
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(BASE, model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
}
TOL = 1e-5  # fp32 logits: the same per-row matmuls and per-token sums in expert order as one process


def _worker(rank, world, port, q):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from executor.expert_parallel import ExpertParallelExperts, apply_ep
    from executor.kd.grad_hooks import ByteCounter
    from executor.models import build_model, materialize

    init_gloo(rank, world, port)
    try:
        out = {}
        for family, cfg in CONFIGS.items():
            spec = from_hf_config(cfg, f"tiny-{family}")
            ref = materialize(build_model(spec), seed=7)
            # each rank its own tokens (different batches, so the exchange is uneven both ways)
            g = torch.Generator().manual_seed(100 + rank)
            x = torch.randint(0, spec.vocab_size, (3, 16), generator=g)
            with torch.no_grad():
                want = ref(input_ids=x).logits
            mesh = DeviceMesh("cpu", torch.arange(world), mesh_dim_names=("ep",))
            counter = ByteCounter()
            ep = build_model(spec)
            replaced = apply_ep(ep, mesh, counter)
            materialize(ep, seed=7)
            ep.eval()
            # routing counts, by hand: top-k of the router on the reference's own hidden states
            seen = []
            hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].reshape(-1).clone()))
                     for m in ep.modules() if isinstance(m, ExpertParallelExperts)]
            with torch.no_grad():
                got = ep(input_ids=x).logits
            for h in hooks:
                h.remove()
            local = [m.gate_up_proj.to_local().shape[0] for m in ep.modules() if isinstance(m, ExpertParallelExperts)]
            # bytes: every assignment routed to the other rank's experts travels there and back,
            # h floats each way; what comes from the other rank likewise (exchanged below)
            mine_out = sum(int(((e // 2) != rank).sum()) for e in seen)
            others = torch.tensor([mine_out])
            dist.all_reduce(others)  # both ranks' routed-away assignments
            expect = int(others) * spec.hidden_size * 4  # mine there and back: mine + theirs, fp32 rows
            out[family] = dict(err=float((got - want).abs().max()), scale=float(want.abs().max()), replaced=replaced,
                               moe_layers=spec.moe_layers, local=local, sent=counter.get("expert_parallel"),
                               expect=expect)
        q.put((rank, out))
    finally:
        close_process_group()


def test_expert_parallel_teacher_matches_one_process():
    """2 ranks, ep = 2, each holding 2 of 4 experts per block, on different tokens: logits equal
    the one-process model's within TOL (Qwen3-MoE, Mixtral, DeepSeek-V3 with its dense first block
    and shared expert); bytes sent = the routed rows each way, counted from the routing."""
    results = spawn_gloo(_worker, 2)
    for rank, fams in results.items():
        for family, r in fams.items():
            assert r["replaced"] == r["moe_layers"] and r["local"] == [2] * r["moe_layers"], (family, r)
            assert r["err"] <= TOL * max(1.0, r["scale"]), (rank, family, r)
            assert r["sent"] == r["expect"] and r["sent"] > 0, (rank, family, r)


def test_expert_parallel_teacher_runs_in_the_executor_and_matches_one_process(tmp_path):
    """The executor honours teacher.layout.ep: a tiny Qwen3-MoE teacher (4 experts, top-2, 2 MoE
    blocks; its checkpoint stores the experts one by one, each rank reads only its own two) with
    ep = 2 over its 2 dp ranks distils a tiny Gemma-2-style student (dp = 2); the KD losses of every
    step match the one-process run, and the all-to-alls' bytes are reported."""
    from exec_helpers import layout, losses
    from test_exec_layouts import _run, family_plans

    fam = family_plans(tmp_path)
    def ep_plan(**update):
        plan = fam(layout(dp=2), layout(dp=2))
        plan.teacher.layout = plan.teacher.layout.model_copy(update={"ep": 2, **update})  # the teacher has experts now
        return type(plan).model_validate(plan.model_dump())

    ref_report, _ = _run(tmp_path, "ep-ref", fam(layout(), None), 1)
    report, _ = _run(tmp_path, "ep2", ep_plan(), 2)
    assert losses(report) == pytest.approx(losses(ref_report), rel=2e-5)
    sent = report["measured"]["bytes_per_step"]["expert_parallel"]
    # at most every assignment leaves its rank and comes back: 2 blocks x 2 all-to-alls x
    # (8 x 32 tokens x top-2) rows of h = 32 fp32 values
    assert 0 < sent <= 2 * 2 * (8 * 32 * 2) * 32 * 4
    assert "expert_parallel" not in ref_report["measured"]["bytes_per_step"]
    # with the weights streamed from host memory, each rank streams its own experts' share
    streamed, _ = _run(tmp_path, "ep2-offload", ep_plan(offload="weights"), 2)
    assert losses(streamed) == pytest.approx(losses(ref_report), rel=2e-5)
    assert streamed["measured"]["bytes_per_step"]["expert_parallel"] == sent
    assert 0 < streamed["measured"]["bytes_per_step"]["offload"]


@pytest.mark.parametrize("update, needle", [({"zero": 3}, "--fix teacher.zero=0")])
def test_expert_parallel_combinations_the_executor_does_not_run_are_refused(tmp_path, update, needle):
    from exec_helpers import layout
    from test_exec_layouts import _family_plan

    from executor.launch import Refused, check

    plan = _family_plan(tmp_path, layout(dp=2), layout(dp=2))
    plan.teacher.layout = plan.teacher.layout.model_copy(update={"ep": 2, **update})
    plan = type(plan).model_validate(plan.model_dump())
    with pytest.raises(Refused, match=r"teacher\.layout\.ep = 2: .*" + needle):
        check(plan, world_size=2, device="cpu")
    plan.teacher.layout = plan.teacher.layout.model_copy(update={"offload": "none", "zero": 0})
    check(type(plan).model_validate(plan.model_dump()), world_size=2, device="cpu")  # ep alone runs
