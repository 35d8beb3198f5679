"""Standalone GEDI: seconds per training step of each method, measured side by side in one run.

Each method is ``configs/gedi_mnist.yaml`` with the overrides below (the rows of the standalone
table in docs/benchmarks.md, and the SGLD step counts of its SGLD table). Every method trains on
the same random 64-image batches (no MNIST files needed): ``--warmup`` untimed steps, then
``--steps`` timed ones, repeated ``--rounds`` times in turn so that a change in machine load
touches every method alike; the median round is reported, with the ratio to GEDI without L_GEN.

    python benchmarks/gedi_step_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gedi_nesy.config import GediRunConfig
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.schema import load_config
from gedi_nesy.train.standalone import GediTrainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gedi_mnist.yaml"
METHODS = {  # name -> overrides of configs/gedi_mnist.yaml
    "gedi without L_GEN": ["gedi.w_gen=0"],
    "SwAV": ["gedi.method=swav"],
    "gedi, SGLD 5 steps": ["sgld.n_steps=5"],
    "gedi, SGLD 10 steps (recipe)": [],
    "gedi, SGLD 20 steps (spec)": ["sgld.n_steps=20"],
    "JEM": ["gedi.method=jem"],
}


def time_steps(trainer: GediTrainer, batches: list[torch.Tensor]) -> float:
    """Seconds for one training step on each of ``batches``."""
    start = time.perf_counter()
    for x in batches:
        trainer.train_step(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(64, 1, 28, 28, generator=generator) * 2 - 1 for _ in range(args.steps)]
    trainers = {}
    for name, overrides in METHODS.items():
        cfg = load_config(CONFIG, GediRunConfig, overrides)
        torch.manual_seed(0)
        trainers[name] = GediTrainer(GEDINet.from_config(cfg.model), cfg, torch.device("cpu"))
        time_steps(trainers[name], batches[: args.warmup])
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            seconds[name].append(time_steps(trainer, batches) / args.steps)
    base = statistics.median(seconds["gedi without L_GEN"])
    timed = f"median of {args.rounds} rounds of {args.steps}"
    print(f"| method | s / step ({timed}) | x gedi without L_GEN |")
    print("|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
