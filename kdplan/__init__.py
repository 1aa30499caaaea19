"""kdplan: plan, simulate and run knowledge distillation of LLMs on GPU clusters.

The planner package never imports torch: planning and what-if simulation run anywhere.
"""

__version__ = "0.1.0"
