import torch, time, os
torch.set_num_threads(1)
F=torch.nn.functional
from executor.hostmem import retain_host_memory; retain_host_memory()
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diag_setup import *  # noqa: F401,F403
def cpu(fn, reps=9):
    fn(); ts=[]
    for _ in range(reps):
        c=time.process_time(); fn(); ts.append(time.process_time()-c)
    return min(ts)
def wall_med(fn, reps=9):
    fn(); ts=[]
    for _ in range(reps):
        c=time.perf_counter(); fn(); ts.append(time.perf_counter()-c)
    return sorted(ts)[len(ts)//2]
src = torch.empty(2**26).uniform_(); dst = torch.empty_like(src)
bw_wall = 2*2**28 / wall_med(lambda: dst.copy_(src)); bw_cpu = 2*2**28/cpu(lambda: dst.copy_(src))
print(f"copy bw wall-median {bw_wall/1e9:.2f} GB/s, cpu-min {bw_cpu/1e9:.2f} GB/s; load {os.getloadavg()[0]:.1f}")
from executor.parallelize import blocks
rot = lambda M: [m for m in M.modules() if "Rotary" in type(m).__name__][0]
for name, M, spec in (("teacher", T, ts), ("student", S, ss)):
    blk = blocks(M)[0]; h, f, d, a = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim, spec.num_heads
    res = {}
    for b in (1, 8):
        x = torch.randn(b, 128, h); pos = torch.arange(128).unsqueeze(0)
        pe = rot(M)(x, pos)
        with torch.no_grad():
            tb = cpu(lambda: blk(x, position_embeddings=pe, attention_mask=None, position_ids=pos))
        lins = [(torch.randn(b*128, m.in_features), m.weight) for m in blk.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            tl = cpu(lambda: [F.linear(xx, w) for xx, w in lins])
        q = torch.randn(b, a, 128, d)
        tа = cpu(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
        res[b] = (tb, tl, tа)
    (b1, l1, a1), (b8, l8, a8) = res[1], res[8]
    dn = 7*128
    slope_rest = ((b8-l8-a8)-(b1-l1-a1))/dn; slope_mm = ((l8+a8)-(l1+a1))/dn
    for frac in (0.2,):
        per = slope_rest - frac*slope_mm
        for bw in (bw_wall, bw_cpu):
            print(f"{name}: rest {slope_rest*1e9:.0f} ns/token, mm {slope_mm*1e9:.0f} ns/token, eager passes at {bw/1e9:.1f} GB/s: {per/((h+f)*4/bw):.1f}; intercept rest {((b1-l1-a1) - slope_rest*128)*1e3:.3f} ms")
