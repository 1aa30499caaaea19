"""The teacher's side of the KD loss computed once for several students, against once per student.

    python benchmarks/shared_targets.py [--students 2] [--tokens 512] [--vocab 8192] [--repeats 5]

For each teacher-output format (dense, topk:64, sample:64) it times, on one thread of this CPU,
the KD loss forward and backward of ``--students`` students over one micro-batch of ``--tokens``
positions: (a) every student from the raw target, as a run of several students did before
(executor.kd.losses.kd_loss recomputes the teacher's side per chunk, in forward and again in the
checkpointed backward), and (b) from one ``prepare_target`` (executor.train: once per batch, in
the teacher's span; one student: in its loss, executor.train._kd) plus every student's loss.
``--students 1`` is a one-student run's loss before (a) and since (b) it prepares its targets. Student logits are random; the loss values of (a)
and (b) are checked equal (bit for bit). Printed: the median CPU time of each over ``--repeats``
alternations (time.process_time) and their ratio. Only the
loss is timed: in a real step the students' models add the same time to (a) and (b).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    import torch

    from executor.kd.compression import decode, encode
    from executor.kd.losses import TeacherTarget, kd_loss, prepare_target
    from kdplan.schema.compression import parse_compression

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    N, V, T = a.tokens, a.vocab, 2.0
    teacher = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    students = [torch.randn(N, V, generator=g).requires_grad_() for _ in range(a.students)]
    print(f"{a.students} students, {N} positions x {V} ids, temperature {T}, 1 thread, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'format':12s}{'per student (s)':>17s}{'prepared once (s)':>19s}{'ratio':>8s}   losses equal")
    for name in ("dense", "topk:64", "sample:64"):
        raw = TeacherTarget.dense(teacher) if name == "dense" else \
            decode(encode(teacher, parse_compression(name), temperature=T), V)

        def losses(target):
            out = []
            for s in students:
                r = kd_loss(s, target, labels, temperature=T, alpha=0.5)
                r.total_sum.backward()
                out.append(r.total_sum.detach())
                s.grad = None
            return out

        times = {"raw": [], "prepared": []}
        for _ in range(a.repeats):
            c = time.process_time()
            want = losses(raw)
            times["raw"].append(time.process_time() - c)
            c = time.process_time()
            got = losses(prepare_target(raw, temperature=T, vocab_size=V))
            times["prepared"].append(time.process_time() - c)
        same = all(torch.equal(x, y) for x, y in zip(want, got))
        t_raw, t_prep = (statistics.median(times[k]) for k in ("raw", "prepared"))
        print(f"{name:12s}{t_raw:17.4f}{t_prep:19.4f}{t_raw / t_prep:7.2f}x   {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
