"""The one-process reference, checked against an independent computation.

Every layout test (test_exec_layouts.py, test_reliability.py) compares a distributed run with the
executor's own one-process run of the same plan. That only means something if the one-process
run computes the right thing; this test recomputes its first step with nothing of the executor's
model or loss code: plain Hugging Face models (LlamaForCausalLM, eager attention, built from a
config written here from the plan's ModelSpec) and KD written out with log_softmax:

    kd_t  = T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
    ce_t  = -log softmax(student logits)[label]
    loss  = mean over the global batch's tokens of  alpha * kd_t + (1 - alpha) * ce_t

on the same teacher checkpoint, the same student initial weights (an HF checkpoint written here
and given to the executor as run.student_checkpoint) and the same token ids (the executor's data
pipeline picks the rows: what is checked is the model, the loss and the gradient, not sampling).

Tolerances (fp32 on CPU, eager attention here, SDPA in the executor; measured on this machine:
total 1.2e-7, kd 4.2e-7, ce 1.4e-7 relative; gradients 8.1e-7 of each tensor's largest entry):
loss, kd and ce within 1e-5 relative; every gradient tensor within 1e-5 of its largest reference
entry (plus 1e-4 relative).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exec_helpers import STUDENT, launch, layout, make_plan, make_teacher_checkpoint, read_report, write_plan  # noqa: E402

T, ALPHA = 2.0, 0.5


def hf_student_config(spec):
    """A LlamaConfig written from the plan's ModelSpec field by field (not executor.models.hf_config)."""
    return transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions, rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tied_embeddings, attention_bias=spec.qkv_bias, use_cache=False)


def kd_by_hand(s_logits, t_logits, labels):
    """(total, kd, ce) means over tokens, forward KL at temperature T, written out."""
    s, t, y = s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1]), labels.reshape(-1)
    log_ps, log_pt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    kd = T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None])[:, 0]
    return (ALPHA * kd + (1 - ALPHA) * ce).mean(), kd.mean(), ce.mean()


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The executor's one-process first step (report, gradients) and the inputs to recompute it."""
    tmp = tmp_path_factory.mktemp("reference")
    teacher_ck = make_teacher_checkpoint(tmp / "teacher")
    torch.manual_seed(7)
    student = transformers.LlamaForCausalLM(hf_student_config(STUDENT))
    student.save_pretrained(tmp / "student")
    plan = make_plan(tmp, layout(), teacher_ckpt=teacher_ck, loss="forward_kl")
    plan = plan.model_copy(update={"run": plan.run.model_copy(update={"student_checkpoint": str(tmp / "student")})})
    assert (plan.kd.temperature, plan.kd.alpha, str(plan.kd.compression), plan.job.precision) == (T, ALPHA, "dense", "fp32")
    path = write_plan(tmp / "plan.json", plan)
    r = launch(path, 1, "--steps", 1, "--report", tmp / "report.json", "--dump-grads", tmp / "grads",
               "--output-dir", tmp / "out")
    assert r.returncode == 0, r.stderr[-4000:]
    grads = torch.load(tmp / "grads" / "rank0.pt", weights_only=True)
    # the rows of step 0, picked by the executor's own data pipeline (cached by the run above)
    from executor.data import Batches
    from executor.launch import prepare
    rows = Batches(prepare(plan, tmp / "out").rows, global_batch=plan.job.global_batch,
                   seed=plan.run.seed).global_batch_at(0)
    return read_report(tmp / "report.json"), grads, rows, teacher_ck, tmp / "student"


def test_one_process_reference_matches_plain_hf_and_log_softmax_kd(one_step):
    report, grads, rows, teacher_ck, student_ck = one_step
    ids, labels = rows[:, :-1], rows[:, 1:]
    assert ids.shape == (8, 32) and int(labels.min()) >= 0  # every position counts (no padding)
    teacher = transformers.LlamaForCausalLM.from_pretrained(teacher_ck, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    student = transformers.LlamaForCausalLM.from_pretrained(student_ck, attn_implementation="eager",
                                                            dtype=torch.float32).train()
    with torch.no_grad():
        t_logits = teacher(ids).logits
    total, kd, ce = kd_by_hand(student(ids).logits, t_logits, labels)
    total.backward()

    got = report["measured"]["loss"][0]
    assert got["step"] == 0
    assert got["total"] == pytest.approx(float(total), rel=1e-5)
    assert got["kd"] == pytest.approx(float(kd), rel=1e-5)
    assert got["ce"] == pytest.approx(float(ce), rel=1e-5)
    ref = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref), (sorted(set(ref) ^ set(grads)))
    for name, g in ref.items():
        assert float(g.abs().max()) > 0, name  # every parameter takes part in the step
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_kd_by_hand_is_the_textbook_loss():
    """The hand computation itself, on a case small enough to check by other means: a student
    equal to the teacher has kd 0; a uniform student against a one-hot-ish teacher has
    kd = T^2 (log V - H(p_t)); ce is the label's negative log-probability."""
    V = 5
    t = torch.tensor([[4.0, 0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[0]])
    total, kd, ce = kd_by_hand(t.clone(), t, y)
    assert float(kd) == pytest.approx(0.0, abs=1e-7)
    assert float(ce) == pytest.approx(-float(torch.log_softmax(t, -1)[0, 0]))
    p = torch.softmax(t / T, -1)[0]
    entropy = float(-(p * p.log()).sum())
    _, kd_u, _ = kd_by_hand(torch.zeros(1, V), t, y)
    assert float(kd_u) == pytest.approx(T * T * (torch.log(torch.tensor(float(V))).item() - entropy), rel=1e-6)
    assert float(total) == pytest.approx(ALPHA * float(kd) + (1 - ALPHA) * float(ce))
