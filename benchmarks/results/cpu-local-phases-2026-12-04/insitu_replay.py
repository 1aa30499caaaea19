"""In-situ (the executor's step order, one process) vs isolated (hot loop) CPU times, interleaved."""
import time, torch, statistics, os, sys, collections
torch.set_num_threads(1)
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diag_setup import *  # noqa: F401,F403
from executor.kd.losses import TeacherTarget
comp = parse_compression("sample:64")
kd = SimpleNamespace(loss="forward_kl", temperature=2.0, alpha=0.5, beta=0.5)
opt = torch.optim.AdamW(S.parameters(), lr=1e-4)
ids = torch.randint(0, V, (8, 128)); labels = torch.randint(0, V, (8, 128))
offs = torch.rand(256, dtype=torch.float64)
import resource, ctypes
P = time.process_time
def FLT(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
MODE = os.environ.get("MODE", "")
if MODE:
    libc = ctypes.CDLL("libc.so.6")
    for kv in MODE.split(","):
        k, v = kv.split("=")
        print("mallopt", k, v, libc.mallopt(int(k), int(v)))
def step(acc):
    t = P(); tl = []
    for m in range(8):
        with torch.no_grad(): tl.append(T(ids[m:m+1]).reshape(-1, V))
    t1 = P(); acc["teacher fwd"].append(t1 - t); tg = []
    for m in range(4):
        lg = torch.cat(tl[2*m:2*m+2]); tg.append(encode(lg, comp, temperature=2.0, offsets=offs))
    t2 = P(); acc["encode"].append(t2 - t1)
    tg = [decode(x, V) for x in tg]
    t3 = P(); acc["decode"].append(t3 - t2)
    f = l = b = lb = 0.0
    for m in range(4):
        a = P(); out = S(ids[2*m:2*m+2]); out = getattr(out, "logits", out)
        c = P(); mark = []
        out.register_hook(lambda g: mark.append(P()))
        r = _kd(out.reshape(-1, V), tg[m], labels[2*m:2*m+2].reshape(-1), kd, V).total_sum
        d = P(); r.backward(); e = P()
        f += c - a; l += d - c; b += e - d; lb += mark[0] - d
    acc["student fwd"].append(f); acc["loss fwd"].append(l); acc["loss bwd"].append(lb); acc["blocks bwd"].append(b - lb)
    a = P(); opt.step(); opt.zero_grad(set_to_none=True); acc["optimizer"].append(P() - a)
    acc["STEP"].append(P() - t)
    acc["faults/1000"].append(FLT() / 1e6)
acc = collections.defaultdict(list)
for _ in range(2): step(collections.defaultdict(list))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 6
# isolated pieces
lg0 = torch.randn(256, V); tg0 = decode(encode(lg0, comp, temperature=2.0, offsets=offs), V)
def iso_t():
    with torch.no_grad(): T(ids[0:1])
def iso_s():
    out = S(ids[0:2]); out = getattr(out, "logits", out); out.sum().backward(); opt.zero_grad(set_to_none=True)
lgr = torch.randn(256, V, requires_grad=True)
def iso_loss():
    lgr.grad = None; _kd(lgr, tg0, labels[0:2].reshape(-1), kd, V).total_sum.backward()
def iso_enc(): encode(lg0, comp, temperature=2.0, offsets=offs)
iso = collections.defaultdict(list)
for i in range(N):
    step(acc)
    for name, fn, k in (("teacher fwd x8", iso_t, 8), ("encode x4", iso_enc, 4), ("loss fwd+bwd x4", iso_loss, 4)):
        fn(); ts = []
        for _ in range(3):
            a = P(); fn(); ts.append(P() - a)
        iso[name].append(min(ts) * k)
print(f"load {os.getloadavg()[0]:.1f}")
acc["faults/1000"] = [(b - a) for a, b in zip(acc["faults/1000"], acc["faults/1000"][1:])] or [0]
for k, v in acc.items(): print(f"in situ  {k:<16}{min(v)*1e3:8.1f} ms min {statistics.median(v)*1e3:8.1f} median")
for k, v in iso.items(): print(f"isolated {k:<16}{min(v)*1e3:8.1f} ms min {statistics.median(v)*1e3:8.1f} median")
