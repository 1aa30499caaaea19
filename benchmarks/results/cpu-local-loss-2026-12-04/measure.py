"""One-off (session 6, cpucal): measure what `kdplan profile` now measures beyond the shipped
cpu-local (the loss per teacher-target kind and the sampled encoding at the profiled vocabularies;
AdamW over large tensors) with the same executor.bench code, and add it to the shipped profile in
the unit of its fitted loss pass. The full re-measurement is benchmarks/cpu_local_refresh.py."""
import json
from kdplan.calibrate.profile import make_spec, measure, _fit_loss_kinds, fit_optimizer, dump_yaml, _sig
from kdplan.profiles import load_cluster
from kdplan.schema.cluster import ClusterFile, HardwareFile
from kdplan.io import write_atomic, load_model
spec = make_spec(["examples/tiny-cpu/teacher/config.json", "gpt-1.3b", "llama-3.2-1b"], "quick", ["fp32"], "cpu")
ov = spec["overheads"]
spec.update(gemms=[], attention=[], ops=[], sizes=[], loss={}, topk={},
            overheads=dict(ov, variants=[], layers=[], tokens=[]))
raw = measure(spec, 2)
json.dump(raw, open("/tmp/cpucal/oneoff-raw.json", "w"), indent=1)
cl = load_cluster("cpu-local")
gpu = cl.gpu_of_group(0)
new = _fit_loss_kinds(raw, gpu, cl.overheads.loss_bytes_per_s_fraction)
per, frac, notes = fit_optimizer(raw["optimizer"], gpu.memory_bandwidth_gb_per_s)
print(new.loss_passes, new.sample_passes, frac, notes, raw["meta"]["loadavg"])
write_atomic("profiles/hardware/cpu-core.yaml", dump_yaml(HardwareFile(gpu=new)))
cf = load_model(ClusterFile, "profiles/clusters/cpu-local.yaml")
load = raw["meta"]["loadavg"]
prov = cf.provenance.model_copy(update={"notes": cf.provenance.notes + (
    f"; the student's loss per teacher-target kind, the teacher's sample:64 encoding (cpu-core loss_passes, "
    f"sample_passes) and overheads.optimizer_bytes_per_s_fraction ({'; '.join(notes)}) measured 2026-12-04 by the "
    f"same executor.bench code as `kdplan profile` (2 processes, process CPU time, load average {load[0]:.1f} before, "
    f"{load[1]:.1f} after: likely high), in the unit of the 2026-11-28 loss fit; the whole profile is re-measured "
    f"by python benchmarks/cpu_local_refresh.py on an idle machine")})
cf = cf.model_copy(update={"provenance": prov, "overheads": cf.overheads.model_copy(update={"optimizer_bytes_per_s_fraction": _sig(frac)})})
write_atomic("profiles/clusters/cpu-local.yaml", dump_yaml(cf))
