"""The planner package never imports torch (planning runs anywhere, in seconds)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_planner_imports_without_torch():
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('kdplan must not import torch: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kdplan\n"
        "for m in pkgutil.walk_packages(kdplan.__path__, 'kdplan.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_no_torch_import_statements_in_planner():
    offenders = []
    for p in (ROOT / "kdplan").rglob("*.py"):
        for line in p.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import torch", "from torch")):
                offenders.append(f"{p}: {s}")
    assert not offenders, offenders
