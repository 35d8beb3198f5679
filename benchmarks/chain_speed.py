"""Where the time of a long-addition run goes: the joint step, its logic and its network, and the
evaluation, on the real task a config builds (MNIST files needed).

For the config's task and trainer (``configs/mnist_addition15.yaml``, ``...100.yaml``), after
one untimed step: seconds per training step (the whole ``train_step``), the logic alone
(``query_log_probs`` forward and backward on the step's tables), the network alone (forward and
backward over the step's 2N x batch images), and per test query the exact best sum
(``best_answers``, hull pruning) and the sum of the argmax digits; then seconds per epoch =
steps per epoch x seconds per step. One torch thread (``optim.threads``). Example:

    python benchmarks/chain_speed.py configs/mnist_addition15.yaml --steps 3 --eval 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gedi_nesy.config import NesyRunConfig
from gedi_nesy.logic.program import ProbabilityTable, argmax_tables
from gedi_nesy.schema import load_config
from gedi_nesy.train.run import build_trainer
from gedi_nesy.train.runtime import torch_threads
from tasks.mnist_addition import build


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_parts(trainer, queries) -> dict[str, float]:
    """Seconds of the logic's forward + backward and of the network's, on one batch."""
    routes = trainer.route(queries)
    images = {name: trainer.images(keys) for name, keys in routes.items()}
    tables, _ = trainer.forward_tables(routes, images)
    leaves = {
        name: ProbabilityTable(t.keys, t.probs.detach().requires_grad_())
        for name, t in tables.items()
    }

    def logic() -> None:
        trainer.logic.query_log_probs(queries, leaves).log_probs.sum().backward()

    def network() -> None:
        sum(trainer.nets[n](x).sum() for n, x in images.items()).backward()

    return {"logic_s": _timed(logic), "network_s": _timed(network)}


def measure(cfg: NesyRunConfig, steps: int, n_eval: int) -> dict[str, float]:
    task = build(cfg.task, cfg.data.root)
    trainer = build_trainer(cfg, task, torch.device("cpu"))
    batch = cfg.optim.batch_size
    chunks = [task.train[i * batch : (i + 1) * batch] for i in range(steps + 1)]
    trainer.train_step(chunks[0])  # untimed: first-call costs
    step_s = sum(_timed(lambda c=c: trainer.train_step(c)) for c in chunks[1:]) / steps
    parts = [step_parts(trainer, c) for c in chunks[1:]]
    test = task.test[:n_eval]
    best_s = _timed(lambda: trainer.predict_answers(test)) / len(test)
    argmax_s = _timed(lambda: trainer.predict_answers(test, argmax_tables)) / len(test)
    steps_per_epoch = -(-len(task.train) // batch)
    return {
        "n_digits": cfg.task["n_digits"],
        "batch": batch,
        "step_s": round(step_s, 3),
        "logic_fwd_bwd_s": round(sum(p["logic_s"] for p in parts) / steps, 4),
        "network_fwd_bwd_s": round(sum(p["network_s"] for p in parts) / steps, 3),
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": round(steps_per_epoch * step_s, 1),
        "best_sum_s_per_query": round(best_s, 5),
        "argmax_sum_s_per_query": round(argmax_s, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eval", type=int, default=64, help="test queries to time")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, NesyRunConfig, args.overrides)
    with torch_threads(cfg.optim.threads):
        print(json.dumps(measure(cfg, args.steps, args.eval)))


if __name__ == "__main__":
    main()
