"""Training on Ray Train: the driver and the per-worker recipes."""
