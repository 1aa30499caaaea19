"""kdplan.sim."""
