"""Training: the fit loop, the joint logic + GEDI step, standalone GEDI training, run files."""
