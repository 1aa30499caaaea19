"""kdplan's executor: runs a plan with torch.distributed (launched by torchrun).

Depends on the planner only through the plan schema (kdplan.schema).
"""
