"""The tiny example's shipped teacher must be clearly better on held-out text than a student-sized
model trained on the labels alone (design.md §7), or KD measurements on it mean little. It is: the
teacher was pre-trained on 3.5x more text (the Shakespeare not in tinyshakespeare, checked here
not to contain the held-out text), the student on the distillation corpus alone; measured gap in
teacher-ckpt/README.md.

Both checkpoints are shipped (examples/tiny-cpu/teacher-ckpt, student-labels-ckpt), trained by
benchmarks/train_tiny_teacher.py with early stopping on the same held-out split; here they are only
evaluated (a few seconds of CPU), on the split the executor holds out."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from executor import data, models, pretrain  # noqa: E402
from kdplan.models import load_model_spec  # noqa: E402

pytestmark = [pytest.mark.executor]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu"
MARGIN_NATS = 0.15  # design.md §7's "clearly better" (issue 5's target); measured gaps: teacher-ckpt/README.md


def test_example_configs_match_the_brief():
    t, s = load_model_spec(str(EXAMPLE / "teacher")), load_model_spec(str(EXAMPLE / "student"))
    assert (t.family, t.num_layers, t.hidden_size, t.vocab_size) == ("llama", 4, 256, 8192)
    assert (s.family, s.num_layers, s.hidden_size, s.vocab_size) == ("llama", 2, 128, 8192)
    assert s.num_params() < t.num_params() / 2.5


def _load(ckpt: str, config_dir: str):
    spec = load_model_spec(str(EXAMPLE / config_dir))
    # the shipped config.json describes the same model as the example's config
    assert load_model_spec(str(EXAMPLE / ckpt)).model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})
    return models.load_checkpoint(models.build_model(spec), EXAMPLE / ckpt)


def test_shipped_checkpoint_and_tokenizer_load():
    teacher = _load("teacher-ckpt", "teacher")
    assert (EXAMPLE / "teacher-ckpt" / "model.safetensors").stat().st_size < 20e6  # bf16, small in git
    assert all(torch.isfinite(p).all() for p in teacher.parameters())
    tok = data.get_tokenizer(tokenizer_dir=str(EXAMPLE / "tokenizer"))
    assert len(tok) == teacher.config.vocab_size == 8192
    # the shipped tokenizer is the one the executor would train itself on the shipped corpus
    models.check_vocab(tok, data.get_tokenizer(texts=data.load_texts(None), vocab_size=8192))


def _heldout_losses() -> dict[str, float]:
    torch.set_num_threads(1)
    tok = data.get_tokenizer(tokenizer_dir=str(EXAMPLE / "tokenizer"))
    seq_len = json.loads((EXAMPLE / "teacher-ckpt" / "pretrain.json").read_text())["hyperparameters"]["seq_len"]
    _, held = data.split_heldout(data.pack(data.tokenize(data.load_texts(None), tok), seq_len))
    losses = {}
    for ckpt, cfg in (("teacher-ckpt", "teacher"), ("student-labels-ckpt", "student")):
        losses[cfg] = pretrain.evaluate(_load(ckpt, cfg), held)
        info = json.loads((EXAMPLE / ckpt / "pretrain.json").read_text())
        assert losses[cfg] == pytest.approx(info["heldout_loss"], abs=2e-3)  # the recorded number is this one
    print(f"held-out CE: teacher {losses['teacher']:.3f}, label-only student {losses['student']:.3f} nats/token")
    return losses


@pytest.fixture(scope="module")
def heldout_losses():
    return _heldout_losses()


def test_shipped_teacher_carries_information(heldout_losses):
    # far below uniform (ln 8192 = 9.0) and below the 64-step fallback pre-training (5.73)
    assert heldout_losses["teacher"] < 5.2, heldout_losses


def test_teacher_beats_label_only_student(heldout_losses):
    assert heldout_losses["teacher"] < heldout_losses["student"] - MARGIN_NATS, heldout_losses


def test_teacher_extra_text_does_not_contain_the_heldout_text():
    """The teacher's extra pre-training text (teacher-corpus/, the Shakespeare not in
    tinyshakespeare) must not leak the held-out split: every 8-word sequence of the held-out rows
    (decoded exactly as the executor holds them out) is looked up in it; a handful of stock phrases
    may recur in other plays, a copied passage would give hundreds."""
    import lzma
    import re

    def grams(text, n=8):
        w = re.sub(r"[^a-z ]", "", text.lower().replace("\n", " ")).split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    tok = data.get_tokenizer(tokenizer_dir=str(EXAMPLE / "tokenizer"))
    _, held = data.split_heldout(data.pack(data.tokenize(data.load_texts(None), tok), 128))
    held_grams = grams(tok.decode(held[:, :-1].reshape(-1).tolist()))
    extra = lzma.decompress((EXAMPLE / "teacher-corpus" / "shakespeare-more.txt.xz").read_bytes()).decode()
    assert len(extra) > 3 * len(data.load_texts(None)[0])  # ~3x more text than the distillation corpus
    assert len(held_grams) > 9_000  # 124 rows x 128 tokens
    shared = held_grams & grams(extra)
    assert len(shared) <= 5, sorted(shared)[:10]
    # and nothing of the training split either: the plays tinyshakespeare is cut from were dropped
    tiny_lines = {ln.strip() for ln in data.load_texts(None)[0].splitlines() if len(ln.split()) >= 6}
    extra_lines = [ln.strip() for ln in extra.splitlines() if len(ln.split()) >= 6]
    assert sum(ln in tiny_lines for ln in extra_lines) < 0.002 * len(extra_lines)


def test_job_run_paths_resolve_relative_to_the_job_file(tmp_path, monkeypatch):
    from kdplan.cli.common import problem_from_flags

    monkeypatch.chdir(tmp_path)  # not the repository root: the paths must not depend on the cwd
    run = problem_from_flags(str(EXAMPLE / "job.toml")).job.run
    assert run.teacher_checkpoint == str((EXAMPLE / "teacher-ckpt").resolve())
    assert run.tokenizer == str((EXAMPLE / "tokenizer").resolve())
    assert run.output_dir == "runs/tiny-cpu"  # outputs stay relative to the cwd


def test_early_stopping_keeps_the_best_weights_and_dropout_is_training_only():
    from kdplan.schema import ModelSpec

    torch.set_num_threads(1)
    spec = ModelSpec(name="t", family="llama", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                     ffn_hidden_size=64, vocab_size=64, max_positions=32)
    g = torch.Generator().manual_seed(0)
    rows, held = torch.randint(0, 64, (64, 17), generator=g), torch.randint(0, 64, (8, 17), generator=g)
    m = pretrain.train_labels_only(spec, data=rows, heldout=held, eval_every=2, steps=8, batch=8, seq_len=16,
                                   lr=3e-2, weight_decay=0.0, dropout=0.2, resid_dropout=0.3, seed=0)
    assert [s for s, _ in m.evals] == [2, 4, 6, 8]
    assert m.best[1] == min(h for _, h in m.evals)
    assert pretrain.evaluate(m, held) == pytest.approx(m.best[1], abs=1e-5)  # the best weights were restored
    x = held[:2, :-1]
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, m(input_ids=x).logits)  # eval: deterministic
        m.train()
        assert not torch.equal(m(input_ids=x).logits, m(input_ids=x).logits)  # training: dropout on
