"""One home for the storage read bandwidth: the cluster's storage tiers (groups[].node.local_storage,
shared_storage). Offline KD's step reads its teacher outputs at the first tier's per-node rate
(kdplan.cost.job.offline_read_gb_per_s); the whole-job planner narrows the cluster to the tier it
puts the cache on. The old ``overheads.storage_read_gb_per_s`` (a 5 GB/s default written into every
profile) loads with a one-line deprecation warning and is not read."""

import warnings

import pytest
from conftest import ROOT, run_kdplan

from kdplan.cost.job import offline_read_gb_per_s, storage_tiers
from kdplan.errors import InputError
from kdplan.jobs import resolve
from kdplan.planner import make_plan
from kdplan.profiles import load_cluster, scale_cluster
from kdplan.schema import JobSpec
from kdplan.schema.cluster import DeprecatedField, Overheads
from kdplan.search.job import _with_read

OLD_PROFILE = ROOT / "tests" / "data" / "calibration-loop-2026-11-28" / "profile.yaml"


def _offline_step(cluster) -> float:
    job = JobSpec(teacher="gpt-6.7b", student="gpt-1.3b", cluster="dgx-a100-80g", gpus=8, seq_len=1024,
                  global_batch=64)
    p = resolve(job, pins=["kd.mode=offline", "kd.compression=dense"])
    p.cluster = scale_cluster(cluster, 8)
    return make_plan(p, top_k=0).prediction.step_time_s


def test_the_old_key_loads_with_a_warning_and_is_not_read():
    with pytest.warns(DeprecatedField, match="storage_read_gb_per_s = 7.0 is deprecated and not read"):
        o = Overheads.model_validate({"storage_read_gb_per_s": 7.0, "framework_memory_gib": 1.0})
    assert o.framework_memory_gib == 1.0 and "storage_read_gb_per_s" not in o.model_dump()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Overheads.model_validate({"framework_memory_gib": 1.0})  # no key, no warning


def test_kdplan_prints_the_deprecation_in_one_line():
    r = run_kdplan("plan", "--cluster", OLD_PROFILE, "--teacher", "none", "--student", "gpt-1.3b", "--gpus", "2",
                   "--seq-len", "128", "--global-batch", "8", timeout=120)
    lines = [x for x in r.stderr.splitlines() if "storage_read_gb_per_s" in x]
    assert r.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning: "), r.stderr


def test_offline_reads_are_priced_at_the_storage_tier():
    """The offline step's exposed read follows the tier's read_gb_per_s: halving it where the
    read binds (dense outputs over a slow local disk) doubles the step."""
    base = load_cluster("dgx-a100-80g")
    assert offline_read_gb_per_s(base) == base.groups[0].node.local_storage.read_gb_per_s

    def with_local_read(gb):
        node = base.groups[0].node
        node = node.model_copy(update={"local_storage": node.local_storage.model_copy(update={"read_gb_per_s": gb})})
        return base.model_copy(update={"groups": [base.groups[0].model_copy(update={"node": node})]})

    # dense outputs of a 50,257-token vocabulary: 6.6 GB per step of 64 x 1,024 tokens, 13 s at 0.5 GB/s
    slow, slower = _offline_step(with_local_read(0.5)), _offline_step(with_local_read(0.25))
    assert slower == pytest.approx(2 * slow, rel=0.05), (slow, slower)


def test_no_tier_no_offline_step():
    base = load_cluster("dgx-a100-80g")
    bare = base.model_copy(update={"shared_storage": None, "groups": [
        g.model_copy(update={"node": g.node.model_copy(update={"local_storage": None})}) for g in base.groups]})
    assert offline_read_gb_per_s(bare) is None
    with pytest.raises(InputError, match="lists no storage to read the teacher outputs from"):
        _offline_step(bare)


def test_the_job_planner_narrows_the_cluster_to_the_cache_tier():
    """A step plan of the job reads at the chosen tier's per-node rate, also side by side on fewer
    nodes (every node of the job shares a shared file system)."""
    cl = load_cluster("dgx-h100")
    assert cl.shared_storage is not None and cl.groups[0].node.local_storage is not None
    nodes = cl.groups[0].num_nodes
    local, shared = storage_tiers(cl)
    assert offline_read_gb_per_s(_with_read(cl, local)) == pytest.approx(local.per_node_read_gb_per_s)
    assert offline_read_gb_per_s(_with_read(cl, shared)) == pytest.approx(shared.per_node_read_gb_per_s)
    assert shared.per_node_read_gb_per_s == pytest.approx(cl.shared_storage.read_gb_per_s / nodes)
    if nodes > 1:
        half = scale_cluster(cl, cl.num_gpus // 2)
        assert offline_read_gb_per_s(_with_read(half, shared)) == pytest.approx(shared.per_node_read_gb_per_s)
