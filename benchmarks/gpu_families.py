"""The model families of issue 19 on the run's device: a tiny random config of each family built by
the executor (executor.models.build_model + materialize, the seeded init), run forward and backward
in bf16 on the device and compared with the same weights in fp32 on the CPU.

    python benchmarks/gpu_families.py [--device cuda|cpu]

One line per family, then `families on DEVICE: N of M OK`. Exit 1 if any family fails. Tolerance:
the norm of the logits' difference (bf16 on the device - fp32 on the CPU) over the norm of the fp32
logits must stay under 3e-2 (bf16 keeps 8 bits of mantissa: about 4e-3 per rounding, over 4 tiny
layers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from executor.models import build_model, materialize  # noqa: E402
from executor.pipeline import whole_model  # noqa: E402
from test_exec_families import TINY, tiny  # noqa: E402  the same tiny configs the CPU tests build

TOLERANCE = 3e-2


def check(family: str, dev: torch.device) -> str:
    spec = tiny(family)
    ref = materialize(whole_model(build_model(spec)), seed=1)
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).float()
    m = materialize(whole_model(build_model(spec, dtype=torch.bfloat16)), seed=1).to(dev)  # as the executor builds bf16
    got = m(ids.to(dev))
    got.float().logsumexp(-1).sum().backward()
    finite_grads = all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    diff = got.detach().float().cpu() - want
    err = float(diff.norm() / want.norm())
    ok = err < TOLERANCE and finite_grads
    return f"{'OK' if ok else 'FAIL'} {family}: logits |bf16 - fp32| / |fp32| {err:.1e} (bf16 on {dev} vs fp32 cpu), grads finite {finite_grads}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(ap.parse_args().device)
    ok = 0
    for family in sorted(TINY):
        try:
            line = check(family, dev)
        except Exception as e:  # noqa: BLE001  one family failing does not hide the others
            line = f"FAIL {family}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ok += line.startswith("OK")
        print(line, flush=True)
    print(f"families on {dev}: {ok} of {len(TINY)} OK")
    return 0 if ok == len(TINY) else 1


if __name__ == "__main__":
    sys.exit(main())
