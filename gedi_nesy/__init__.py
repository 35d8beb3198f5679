"""gedi-nesy: GEDI networks (energy-based model + self-supervised clustering) as DeepProbLog
neural predicates, trained jointly with the logic loss.

Public API:
    GEDINet         the network: cluster logits, concept probabilities, energy; its defaults
                    are ModelConfig's (``GEDINet.from_config(cfg)`` builds one from a config)
    CompiledLogic   a ProbLog program with its neural predicates, exact inference compiled once
                    per query template and evaluated a minibatch at a time (the default engine)
    LogicModel      the same through DeepProbLog's own per-query solve
    ColumnChainLogic  N-digit addition as an exact chain of compiled column circuits
    LogicEngine     the protocol every engine keeps (what the trainer needs of one)
    JointTrainer    logic loss + GEDI losses, one routed forward per network, one backward
    JointConfig     the settings the trainer reads (gedi, sgld, augment, optim, supervision)
    run_training    one joint run from a NesyRunConfig and a task (``gedi-nesy train``)
    train_gedi      one standalone GEDI run from a GediRunConfig (``gedi-nesy gedi``)
    load_config     typed YAML configs with overrides
    load_images     MNIST / Fashion-MNIST from raw IDX files
"""

from gedi_nesy.config import (
    GediRunConfig,
    JointConfig,
    ModelConfig,
    NesyRunConfig,
    OptimConfig,
)
from gedi_nesy.data import load_images
from gedi_nesy.errors import GediNesyError
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.engine import LogicEngine
from gedi_nesy.schema import load_config
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.run import run_training
from gedi_nesy.train.standalone import train_gedi

__all__ = [
    "ColumnChainLogic",
    "CompiledLogic",
    "GEDINet",
    "GediNesyError",
    "GediRunConfig",
    "JointConfig",
    "JointTrainer",
    "LogicEngine",
    "LogicModel",
    "ModelConfig",
    "NesyRunConfig",
    "OptimConfig",
    "load_config",
    "load_images",
    "run_training",
    "train_gedi",
]
