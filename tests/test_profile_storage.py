"""kdplan profile measures a storage tier (issue 16: the offline cache's capacity and bandwidths
come from a measurement, not only datasheets). Pure Python: no torch, no torchrun."""

from __future__ import annotations

import pytest

from kdplan.calibrate.storage import BLOCK, measure_storage, with_storage
from kdplan.errors import InputError
from kdplan.profiles import load_cluster


def _clock(times):
    it = iter(times)
    return lambda: next(it)


def test_bandwidth_is_bytes_over_the_timed_interval(tmp_path):
    """A fake clock: write 0 -> 2 s (fsync included), read 10 -> 11 s; 3 blocks written and read."""
    size = 3 * BLOCK
    tier = measure_storage(tmp_path, size, name="nvme", clock=_clock([0.0, 2.0, 10.0, 11.0]))
    assert tier.write_gb_per_s == pytest.approx(size / 2.0 / 1e9)
    assert tier.read_gb_per_s == pytest.approx(size / 1.0 / 1e9)
    assert tier.name == "nvme" and "measured by kdplan profile" in tier.source and "fsync" in tier.source
    assert 0 < tier.capacity_tb < 1e6
    # the capacity is the free space of that path on that day: the tier says so (the job's refusal quotes it)
    import time
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert tier.capacity_measured.startswith(f"free space of {tmp_path} on {today} ")
    assert tier.capacity_measured.endswith(" UTC")
    assert not list(tmp_path.iterdir())  # the measurement file is gone


def test_size_rounds_to_whole_blocks_and_progress_counts_both_passes(tmp_path):
    seen = []
    measure_storage(tmp_path, int(2.5 * BLOCK), progress=lambda d, t, label: seen.append((d, t, label)))
    assert seen[-1] == (4, 4, "storage read") and seen[0] == (1, 4, "storage write")


def test_file_is_removed_when_interrupted(tmp_path):
    def stop(done, total, label):
        if label == "storage read":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        measure_storage(tmp_path, BLOCK, progress=stop)
    assert not list(tmp_path.iterdir())


def test_bad_directories_and_sizes_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        measure_storage(tmp_path / "missing", BLOCK)
    with pytest.raises(InputError, match="free"):
        measure_storage(tmp_path, 10**18)


def test_with_storage_sets_the_named_tier_only(tmp_path):
    base = load_cluster("dgx-a100-80g")
    tier = measure_storage(tmp_path, BLOCK)
    local = with_storage(base, tier, shared=False)
    assert all(g.node.local_storage == tier for g in local.groups) and local.shared_storage == base.shared_storage
    shared = with_storage(base, tier, shared=True)
    assert shared.shared_storage == tier and shared.groups[0].node.local_storage == base.groups[0].node.local_storage


def test_cli_refuses_bad_storage_flags(kdplan_cli, tmp_path):
    r = kdplan_cli("profile", "--tiny", "--storage-tier", "nvme", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "--storage-tier" in r.stderr and "Traceback" not in r.stderr
    r = kdplan_cli("profile", "--tiny", "--storage-dir", tmp_path / "nope", "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr
    r = kdplan_cli("profile", "--tiny", "--storage-tier", "none", "--storage-dir", tmp_path, "-o", tmp_path / "p.yaml")
    assert r.returncode == 2 and "--storage-tier none" in r.stderr
