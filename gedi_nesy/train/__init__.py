"""Training: the one fit loop (``loop``), the joint logic + GEDI step (``joint``), one joint run
from a config (``run``), standalone GEDI training (``standalone``), run files (``runtime``)."""
