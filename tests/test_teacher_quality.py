"""The tiny example's teacher must be clearly better on held-out text than a student-sized model
trained on the labels alone with the same budget (design.md §7), or KD measurements on it mean little.
Trains both for real (~85 s of CPU). The measured gap is only 0.06 nats: the test guards against
regressions (a teacher no better than its student) but does not show the clear gap design.md wants."""

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from executor import data, models, pretrain  # noqa: E402
from kdplan.models import load_model_spec  # noqa: E402

pytestmark = [pytest.mark.executor, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu"
MARGIN_NATS = 0.02  # measured gap 0.061 nats (5.727 vs 5.788): small, see executor.pretrain's docstring


def test_example_configs_match_the_brief():
    t, s = load_model_spec(str(EXAMPLE / "teacher")), load_model_spec(str(EXAMPLE / "student"))
    assert (t.family, t.num_layers, t.hidden_size, t.vocab_size) == ("llama", 4, 256, 8192)
    assert (s.family, s.num_layers, s.hidden_size, s.vocab_size) == ("llama", 2, 128, 8192)
    assert s.num_params() < t.num_params() / 2.5


def test_pretrained_teacher_beats_label_only_student(tmp_path):
    torch.set_num_threads(1)
    texts = data.load_texts(None)
    tok = data.get_tokenizer(texts=texts, vocab_size=8192, cache_dir=str(tmp_path))
    hp = pretrain.RECOMMENDED
    rows = data.pack(data.tokenize(texts, tok), hp["seq_len"])
    train, held = data.split_heldout(rows)
    t_spec = load_model_spec(str(EXAMPLE / "teacher"))
    s_spec = load_model_spec(str(EXAMPLE / "student"))

    ckpt = pretrain.pretrain_teacher(t_spec, train, out_dir=tmp_path, tokenizer=tok, heldout=held, seed=0, **hp)
    info = json.loads((ckpt / "pretrain.json").read_text())
    teacher = models.load_checkpoint(models.build_model(t_spec), ckpt)
    t_loss = pretrain.evaluate(teacher, held)
    assert t_loss == pytest.approx(info["heldout_loss"], abs=1e-4)  # what was saved is what was trained
    models.check_vocab(data.get_tokenizer(tokenizer_dir=str(ckpt)), tok)

    student = pretrain.train_student_labels_only(s_spec, data=train, seed=0, **hp)
    s_loss = pretrain.evaluate(student, held)
    print(f"held-out CE: teacher {t_loss:.3f}, label-only student {s_loss:.3f} nats/token "
          f"(teacher trained {info['train_seconds']:.0f} s)")
    assert t_loss < s_loss - MARGIN_NATS, (t_loss, s_loss)
    assert t_loss < 6.0  # far below uniform (ln 8192 = 9.0): the teacher's outputs carry information

    # cached: same key -> same directory, no training
    t0 = time.perf_counter()
    again = pretrain.pretrain_teacher(t_spec, train, out_dir=tmp_path, seed=0, **hp)
    assert again == ckpt and time.perf_counter() - t0 < 5
    assert not list(tmp_path.glob(".*partial*"))
