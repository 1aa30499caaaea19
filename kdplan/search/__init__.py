"""kdplan.search."""
