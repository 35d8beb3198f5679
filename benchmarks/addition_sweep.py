"""Small-data MNIST addition: DeepProbLog alone vs DeepProbLog + GEDI, over sizes and seeds.

Runs ``gedi-nesy train`` once per (method, n_train, seed) in parallel processes, skips runs whose
metrics.json exists (a killed sweep loses only the runs in flight), and prints a markdown table of
mean ± std. Example (the command behind docs/benchmarks.md):

    python benchmarks/addition_sweep.py --out runs/sweep --n-train 100 300 1000 --seeds 0 1 2 \
        --set task.n_test=1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = {
    "dpl": ["gedi.w_gen=0", "gedi.w_inv=0", "gedi.w_prior=0"],
    "dpl+gedi": [],  # the config's own GEDI weights
}
COLUMNS = ["acc_c", "acc_c_matched", "nmi_c", "test_task_acc", "train_seconds"]


def run_one(
    config: str, out: Path, method: str, n: int, seed: int, budget: int, extra: list[str]
) -> Path:
    name = f"{method}_n{n}_s{seed}"
    run_dir = out / name
    if (run_dir / "metrics.json").is_file():
        return run_dir
    epochs = max(1, -(-budget // n))  # the same number of training queries for every size
    sets = [f"out_dir={out}", f"name={name}", f"task.n_train={n}", f"task.seed={seed}",
            f"optim.seed={seed}", f"optim.epochs={epochs}", f"logic.cache_dir={out / 'circuits'}",
            *METHODS[method], *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "gedi_nesy", "train", config, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.out", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def table(out: Path, n_values: list[int], seeds: list[int]) -> str:
    lines = ["| method | n_train | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    for method in METHODS:
        for n in n_values:
            rows = []
            for seed in seeds:
                path = out / f"{method}_n{n}_s{seed}" / "metrics.json"
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
            if not rows:
                continue
            cells = []
            for col in COLUMNS:
                vals = [float(r[col]) for r in rows]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
            lines.append(f"| {method} | {n} (x{len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_addition.yaml")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--n-train", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--budget", type=int, default=6000, help="training queries per run (epochs x n)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    grid = [(m, n, s) for n in args.n_train for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = [
            pool.submit(run_one, args.config, args.out, m, n, s, args.budget, args.extra)
            for m, n, s in grid
        ]
        for future in done:
            future.result()
    print(table(args.out, args.n_train, args.seeds))


if __name__ == "__main__":
    main()
