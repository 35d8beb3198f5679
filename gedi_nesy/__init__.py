"""gedi-nesy: GEDI networks (energy-based model + self-supervised clustering) as DeepProbLog
neural predicates, trained jointly with the logic loss.

Public API:
    GEDINet         the network: cluster logits, concept probabilities, energy
    CompiledLogic   a ProbLog program with its neural predicates, exact inference compiled once
                    per query template and evaluated a minibatch at a time (the default engine)
    LogicModel      the same through DeepProbLog's own per-query solve
    ColumnChainLogic  N-digit addition as an exact chain of compiled column circuits
    JointTrainer    logic loss + GEDI losses, one batched forward, one backward per step
    load_config     typed YAML configs with overrides
    load_images     MNIST / Fashion-MNIST from raw IDX files
"""

from gedi_nesy.config import GediRunConfig, NesyRunConfig, load_config
from gedi_nesy.data import load_images
from gedi_nesy.errors import GediNesyError
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.train.joint import JointTrainer

__all__ = [
    "ColumnChainLogic",
    "CompiledLogic",
    "GEDINet",
    "GediNesyError",
    "GediRunConfig",
    "JointTrainer",
    "LogicModel",
    "NesyRunConfig",
    "load_config",
    "load_images",
]
