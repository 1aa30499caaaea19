"""kdplan profile on a CPU whose cores the ranks' compute threads fill prices the gradient
all-reduce whole (gloo's thread has no core to overlap on); spare cores or a GPU keep overlap."""
from kdplan.calibrate.profile import _cpu_comm_overlap
from kdplan.schema.cluster import Overheads


def _meta(kind="cpu", local=2, threads=1, cores=2):
    return {"device_kind": kind, "local_world_size": local, "world_size": local, "threads": threads, "cores": cores}


def test_full_cores_turn_overlap_off_with_a_stated_source():
    ov = _cpu_comm_overlap(_meta(), Overheads())
    assert ov.overlap_grad_reduce is False
    assert "2 compute threads on 2 cores" in ov.framework.source


def test_spare_cores_gpu_or_unknown_cores_keep_the_base_setting():
    base = Overheads()
    assert base.overlap_grad_reduce is True
    assert _cpu_comm_overlap(_meta(cores=16), base).overlap_grad_reduce is True
    assert _cpu_comm_overlap(_meta(kind="gpu"), base).overlap_grad_reduce is True
    assert _cpu_comm_overlap(_meta(cores=None), base).overlap_grad_reduce is True
    assert _cpu_comm_overlap(_meta(local=4, threads=1, cores=4), base).overlap_grad_reduce is False
