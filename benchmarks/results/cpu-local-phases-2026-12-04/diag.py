"""Interleaved, single process, process CPU time (min over rounds): executor pieces vs the profile's micro-benchmarks."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diag_setup import *  # noqa: F401,F403
def gemm_fn(spec, tokens, which):
    gs = [g for g in layer_gemms(spec, tokens=tokens) if any(g.label.endswith(w) for w in which)]
    mats = []
    for g in gs:
        reps = 1 if "logits" in g.label else spec.num_layers
        mats.append((torch.randn(g.m,g.k), torch.randn(g.k,g.n), reps, g.label))
    def f():
        for a,b,r,_ in mats:
            for _ in range(r): torch.mm(a,b)
    return f, mats
sdpa = torch.nn.functional.scaled_dot_product_attention
def attn_fn(b, spec):
    q,k,v=(torch.randn(b,spec.num_heads,128,spec.head_dim) for _ in range(3))
    return lambda: [sdpa(q,k,v,is_causal=True) for _ in range(spec.num_layers)]
ids1 = torch.randint(0,V,(1,128)); ids2=torch.randint(0,V,(2,128))
def tf():
    with torch.no_grad(): return T(ids1)
comp = parse_compression("sample:64")
tl = getattr(tf(),"logits",tf()).reshape(-1,V); offs = torch.rand(128, dtype=torch.float64)
kd = SimpleNamespace(loss="forward_kl", temperature=2.0, alpha=0.5, beta=0.5)
labels = torch.randint(0,V,(256,))
tgt = decode(encode(torch.randn(256,V), comp, temperature=2.0, offsets=torch.rand(256,dtype=torch.float64)), V)
def sfull():
    for p in S.parameters(): p.grad=None
    out = S(ids2); out=getattr(out,"logits",out)
    _kd(out, tgt, labels, kd, V).total_sum.backward()
lg = torch.randn(256,V, requires_grad=True)
def lossonly():
    lg.grad=None; _kd(lg, tgt, labels, kd, V).total_sum.backward()
lg2 = torch.randn(256,V, requires_grad=True)
def sfull_noloss():
    for p in S.parameters(): p.grad=None
    out = S(ids2); out=getattr(out,"logits",out)
    out.backward(lg2.detach().view(2,128,V))
opt = torch.optim.AdamW(S.parameters(), lr=1e-3)
for p in S.parameters(): p.grad = torch.zeros_like(p)
tg,_ = gemm_fn(ts, 128, ["fwd"])
sg,_ = gemm_fn(ss, 256, ["fwd","bwd_input","bwd_weight"])
sgf,_ = gemm_fn(ss, 256, ["fwd"])
items = {"teacher fwd mb1": tf, "  teacher gemms fwd": tg, "  teacher sdpa": attn_fn(1, ts),
         "teacher sample encode": lambda: encode(tl, comp, temperature=2.0, offsets=offs),
         "student fwd+loss+bwd mb2": sfull, "student fwd+bwd (no loss) mb2": sfull_noloss,
         "  student gemms fwd+bwd": sg, "  student gemms fwd": sgf, "  student sdpa": attn_fn(2, ss),
         "loss sample fwd+bwd 256": lossonly, "adamw step student": opt.step}
for f in items.values(): f()
res = {k: [] for k in items}
t0=time.time()
for r in range(int(sys.argv[1]) if len(sys.argv)>1 else 5):
    for k,f in items.items(): res[k].append(cpu(f))
print(f"load {os.getloadavg()[0]:.1f}; {time.time()-t0:.0f}s")
for k,v in res.items(): print(f"{k:<34}{min(v)*1e3:9.2f} ms  (median {statistics.median(v)*1e3:.2f})")
