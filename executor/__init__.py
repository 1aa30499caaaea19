"""kdplan's executor: runs a plan with torch.distributed (launched by torchrun).

Depends on the planner only through the plan schema (kdplan.schema).
"""

from pathlib import Path as _Path

CORPUS = _Path(__file__).parent / "corpus" / "tinyshakespeare.txt"
"""The shipped corpus (tinyshakespeare, public domain): the data when a plan names none."""
