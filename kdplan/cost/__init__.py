"""Cost model: prices any teacher/student layout (time, memory, bytes). Pure Python, no torch.

The contract with the solver and simulator is in kdplan/cost/api.py.
"""
