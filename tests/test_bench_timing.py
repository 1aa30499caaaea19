"""executor.bench.run's GPU timer, checked on the CPU with a stand-in for torch.cuda.Event: the
events bracket ALL repetitions (no host round trip per repetition) and the end event is waited on
before its time is read (a timing without a sync measures only the launches)."""

import pytest

torch = pytest.importorskip("torch")

from executor.bench import run as bench  # noqa: E402

pytestmark = pytest.mark.executor


def test_cuda_timer_brackets_all_repetitions_and_syncs(monkeypatch):
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = f"e{sum(c.startswith('new') for c in calls)}"
            calls.append(f"new {self.name}")

        def record(self, stream=None):
            calls.append(f"record {self.name}")

        def synchronize(self):
            calls.append(f"sync {self.name}")

        def elapsed_time(self, end):
            assert f"sync {end.name}" in calls, "read before the end event completed"
            calls.append("read")
            return 12.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("device sync"))
    t = bench.elapsed_s(lambda: calls.append("fn"), 3, cuda=True)
    assert t == pytest.approx(0.012)
    assert calls == ["new e0", "new e1", "record e0", "fn", "fn", "fn", "record e1", "sync e1", "read"]
    # the CPU path never touches CUDA events
    calls.clear()
    assert bench.elapsed_s(lambda: calls.append("fn"), 2, cuda=False) >= 0 and calls == ["fn", "fn"]
