"""kdplan.calibrate."""
