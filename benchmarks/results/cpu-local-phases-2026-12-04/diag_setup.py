"""The shared set-up of diag.py, block_passes.py and insitu_replay.py (imported by each)."""
"""Interleaved, single process, process CPU time (min over rounds): executor pieces vs the profile's micro-benchmarks."""
import time, torch, statistics, os, sys
torch.set_num_threads(1)
from executor.models import build_model, materialize
from executor.pipeline import make_stage
from kdplan.models import load_model_spec
from kdplan.calibrate.shapes import layer_gemms
from executor.kd.compression import encode, decode
from executor.train import _kd
from kdplan.schema.compression import parse_compression
from types import SimpleNamespace
V=8192
def cpu(fn, reps=3):
    ts=[]
    for _ in range(reps):
        c=time.process_time(); fn(); ts.append(time.process_time()-c)
    return min(ts)
def stage(path):
    spec = load_model_spec(path)
    m = make_stage(build_model(spec), 0, spec.num_layers, is_first=True, is_last=True)
    return materialize(m, seed=0, device=torch.device("cpu")), spec
T, ts = stage("examples/tiny-cpu/teacher/config.json")
S, ss = stage("examples/tiny-cpu/student/config.json")
T.eval().requires_grad_(False)
