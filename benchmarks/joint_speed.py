"""Joint-step speed: queries per second of ``JointTrainer.train_step`` per device and digit count.

The whole joint step of the full objective (logic loss, L_GEN with 5 SGLD steps, L_INV,
L_PRIOR; one forward, one backward, one Adam step) on N-digit addition queries over random
28x28 images: the logic engine is the compiled one for N <= 2 and the column chain above. Each
(device, N) runs ``--warmup`` untimed steps (compilation, caches, CUDA kernels), then ``--steps``
timed ones; the compiled engine's circuits are all compiled (or loaded from ``--cache-dir``)
before any step, and CUDA time is synchronised. One process, so ratios between devices are
measured side by side. Needs no MNIST files. Example (the GPU check runs it this way):

    python benchmarks/joint_speed.py --devices cpu cuda --digits 1 2 4 15

``--eval Q`` times the logic of test-time evaluation instead, for each N >= 3 (column chain):
the distribution over all ``2 * 10^N`` sums (``answer_probs``) and the best sum
(``best_answers``) of Q queries from a fixed random table, after one untimed call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gedi_nesy import GEDINet, JointConfig, JointTrainer
from gedi_nesy.config import GediConfig, LogicConfig, SGLDConfig
from gedi_nesy.logic.engine import build_logic
from gedi_nesy.logic.program import ProbabilityTable, tensor_keys
from tasks.mnist_addition import addition_queries

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
FULL_OBJECTIVE = GediConfig(w_gen=0.1, energy_reg=0.01, w_inv=0.1, w_prior=0.1)


def measure(device: str, n_digits: int, batch: int, steps: int, warmup: int, cache: str) -> dict:
    """Seconds per step and queries per second of ``steps`` timed joint steps on ``device``."""
    torch.manual_seed(0)
    n_queries = batch * (steps + warmup)
    images = torch.rand(2 * n_digits * n_queries, 1, 28, 28) * 2 - 1  # (n, 1, 28, 28)
    labels = torch.randint(10, (len(images),))
    queries = addition_queries(torch.arange(len(images)), labels, "train", n_digits)
    engine = "compiled" if n_digits <= 2 else "column_chain"
    program = PROGRAMS / ("addition.pl" if n_digits == 1 else "multi_addition.pl")
    logic = build_logic(LogicConfig(engine=engine, cache_dir=cache), program, {"digit_net": 10})
    if engine == "compiled":
        logic.prepare(queries)  # every sum's circuit compiled (or loaded) before any timing
    cfg = JointConfig(gedi=FULL_OBJECTIVE, sgld=SGLDConfig(n_steps=5))
    trainer = JointTrainer(logic, {"digit_net": GEDINet(k=10)}, {"train": images}, cfg,
                           device=device)  # fmt: skip
    batches = [queries[i * batch : (i + 1) * batch] for i in range(steps + warmup)]
    for chunk in batches[:warmup]:
        trainer.train_step(chunk)
    _sync(device)
    start = time.perf_counter()
    for chunk in batches[warmup:]:
        trainer.train_step(chunk)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {
        "device": device, "digits": n_digits, "engine": engine, "batch": batch,
        "s_per_step": round(seconds, 5), "queries_per_s": round(batch / seconds, 1),
    }  # fmt: skip


def measure_eval(device: str, n_digits: int, n_queries: int, cache: str) -> dict:
    """Seconds per call of the chain's all-sums evaluation of ``n_queries`` queries."""
    torch.manual_seed(0)
    labels = torch.randint(10, (2 * n_digits * n_queries,))
    queries = addition_queries(torch.arange(len(labels)), labels, "train", n_digits)
    queries = [q.variable_output() for q in queries]  # the sum left open
    program = PROGRAMS / "multi_addition.pl"
    logic = build_logic(LogicConfig(engine="column_chain", cache_dir=cache), program,
                        {"digit_net": 10})  # fmt: skip
    keys = tensor_keys(queries)
    probs = torch.softmax(3 * torch.randn(len(keys), 10), -1).to(device)  # (n, 10)
    tables = {"digit_net": ProbabilityTable(keys, probs)}
    domain = range(2 * 10**n_digits)
    row = {"device": device, "digits": n_digits, "queries": n_queries}
    for name, call in (("answer_probs", lambda: logic.answer_probs(queries, domain, tables)),
                       ("best_answers", lambda: logic.best_answers(queries, tables))):  # fmt: skip
        call()
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        row[f"{name}_s"] = round(time.perf_counter() - start, 4)
    return row


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--digits", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache-dir", default="runs/joint_speed_circuits")
    parser.add_argument("--eval", type=int, default=0, metavar="Q",
                        help="time all-sums evaluation of Q queries instead (N >= 3)")  # fmt: skip
    args = parser.parse_args()
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: torch sees no GPU; use --devices cpu")
    if args.eval > 0:
        for n in [n for n in args.digits if n >= 3]:
            for device in args.devices:
                print(json.dumps(measure_eval(device, n, args.eval, args.cache_dir)), flush=True)
        return
    rows = []
    for n in args.digits:
        for device in args.devices:
            rows.append(measure(device, n, args.batch, args.steps, args.warmup, args.cache_dir))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| N | engine | device | s / step | queries / s | vs cpu |\n|---|---|---|---|---|---|")
    cpu = {r["digits"]: r["s_per_step"] for r in rows if r["device"] == "cpu"}
    for r in rows:
        ratio = f"{cpu[r['digits']] / r['s_per_step']:.1f}x" if r["digits"] in cpu else "-"
        print(f"| {r['digits']} | {r['engine']} | {r['device']} | {r['s_per_step']} | "
              f"{r['queries_per_s']} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
