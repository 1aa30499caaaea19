"""The wheel works on its own: built from the source, installed into a fresh venv without torch
(no --system-site-packages: only the wheel and its declared dependencies, from the index pip is
configured with), it plans the seed scenario from outside the checkout, with the cluster
profiles it carries, and the plan is the golden one."""

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest

from conftest import ROOT
from test_plan_golden import GOLDEN, differences, normalized

pytestmark = pytest.mark.slow

# The venv's own kdplan, not this checkout's (pytest runs with PYTHONPATH=<checkout> here).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "KDPLAN_PROFILES")}
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "kdplan", "executor", "profiles")


def _run(argv, **kw):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_installs_without_torch_and_plans_the_seed(tmp_path):
    src, dist, env = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src])
    (wheel,) = dist.glob("kdplan-*.whl")

    venv.create(env, with_pip=True, system_site_packages=False)
    py = env / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", wheel], env=CLEAN_ENV)
    assert subprocess.run([py, "-c", "import torch"], capture_output=True, env=CLEAN_ENV).returncode != 0, \
        "torch leaked into the venv"

    out = tmp_path / "elsewhere"  # not the checkout: the profiles must come from the wheel
    out.mkdir()
    where = _run([py, "-c", "import kdplan.profiles as p; print(p.profiles_dir())"], cwd=out, env=CLEAN_ENV).stdout.strip()
    assert where.startswith(str(env)), where
    r = _run([env / "bin" / "kdplan", "plan", ROOT / "examples" / "seed" / "job.toml", "--json"], cwd=out, env=CLEAN_ENV)
    diff = differences(normalized(r.stdout, ROOT), json.loads((GOLDEN / "seed.json").read_text()))
    assert not diff, "\n".join(diff[:20])
    v = subprocess.run([env / "bin" / "kdplan", "validate"], capture_output=True, text=True, cwd=out, timeout=600,
                       env=CLEAN_ENV)
    assert v.returncode == 0 and "narayanan2021" in v.stdout + v.stderr, v.stderr[-2000:]
