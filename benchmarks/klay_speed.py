"""KLay against our compiled engine: the same SDDs, forward + backward, batch 1 to 1,024.

KLay (Maene et al., ICLR 2025; ``pip install klaycircuits``) evaluates a PySDD circuit layer by
layer in torch. Here both engines start from the SAME SDD: the one ProbLog compiles for a query
template in :func:`gedi_nesy.logic.circuit.compile_circuit` (ground, ``LogicDAG``,
``SDD.create_from``). Ours is that SDD's arithmetic as DeepProbLog evaluates it, recorded and
flattened (:mod:`gedi_nesy.logic.circuit`); KLay loads the SDD nodes themselves: one root per
query answer (the answer's SDD conjoined with the program's constraints, as ProbLog's
``evaluate_custom``) and one for the constraints alone, with the literal weights ProbLog's
``extract_weights`` gives DeepProbLog's semiring (a neural atom's ``p``, an AD's ``1 - sum p``,
negative weight 1 for AD choices), unsmoothed as ProbLog's NNF evaluation; answer / constraints
is the probability.

One "query" is one instance of a template: its own table rows for the template's placeholders
(e.g. two digit images for ``addition(X, Y, 9)``), and all the template's answers for an open
query. Batch B: B instances of one template, from the same (n, K) tables, in one call:

* ours: ``build_program`` (the batch's index arrays) + ``run_program`` + backward, as
  ``CompiledLogic._evaluate`` runs after the template look-up;
* KLay: the (B, V) positive and negative literal weights gathered from the tables, KLay's
  ``to_torch_module(semiring="real")`` (eager unless ``--compile``), the division, backward.

Both end with gradients on the same leaf tables. First each circuit is checked in float64 (values
and table gradients equal to 1e-9); any difference exits with an error. Then each batch size is
timed, ours and KLay alternating, median of ``--repeats``. Example:

    python benchmarks/klay_speed.py --repeats 7 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from problog.logic import Constant, Term, Var, list2term

from gedi_nesy.logic.batch import Group, Layout, build_program, run_program
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.template import query_template

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from klay_circuits import KlayCircuit, klay_circuit, klay_forward, klay_leaf_index  # noqa: E402
from test_compiled import random_program  # noqa: E402  the tests' random program generator

BATCHES = (1, 8, 32, 128, 1024)
ROWS = 1000  # table rows per network (images); each instance draws its rows from these


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


@dataclass(frozen=True)
class Case:
    """One circuit: a program and one query (ground, or with its output a variable)."""

    name: str
    text: str
    networks: dict[str, int]
    query: Term


def cases() -> list[Case]:
    """One- and two-digit addition (a ground sum, all sums), three of the tests' random programs."""
    digits = {"digit_net": 10}
    one = (ROOT / "programs" / "addition.pl").read_text()
    two = (ROOT / "programs" / "multi_addition.pl").read_text()
    a, b = list2term([img(0), img(1)]), list2term([img(2), img(3)])
    found = [
        Case("1-digit, sum 9", one, digits, Term("addition", img(0), img(1), Constant(9))),
        Case("1-digit, all 19 sums", one, digits, Term("addition", img(0), img(1), Var("S"))),
        Case("2-digit, sum 99", two, digits, Term("add", a, b, Constant(99))),
        Case("2-digit, all 199 sums", two, digits, Term("add", a, b, Var("S"))),
    ]
    for seed in (0, 1, 2):
        found.append(Case(f"random program {seed}, p3", random_program(seed),
                          {"net_a": 3, "net_b": 2}, Term("p3", img(0), img(1))))  # fmt: skip
    return found


# --------------------------------------------------------------------------- the comparison


@dataclass
class Bench:
    """One case ready to run: our layout, KLay's circuit, the tables."""

    case: Case
    layout: Layout
    klay: KlayCircuit
    names: list[str]  # networks in batch order (sorted)
    groups: int  # node groups per level, as CompiledLogic uses

    def atom_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Per layout atom: its network's start in the flat tables and its K."""
        k = [self.case.networks[n] for n in self.names]
        start = np.cumsum([0] + [ROWS * kk for kk in k])
        index = {n: i for i, n in enumerate(self.names)}
        nets = [index[n] for n, _, _ in self.layout.atoms]
        return start[nets].astype(np.int64), np.array(k, dtype=np.int64)[nets]


def make_bench(klay: Any, case: Case, cache_dir: Path, compile_module: bool) -> Bench:
    logic = CompiledLogic(case.text, case.networks, cache_dir=cache_dir)
    layout = logic.layout(query_template(case.query)[0])
    kc = klay_circuit(klay, case.text, case.networks, case.query, layout, compile_module)
    return Bench(case, layout, kc, sorted(case.networks), max(2, 1 + len(case.networks)))


def ours_step(bench: Bench, rows: np.ndarray, tables: list[torch.Tensor]) -> torch.Tensor:
    """Our outputs (B, n_outputs): the batch program built and run, as CompiledLogic does."""
    n_out = len(bench.layout.circuit.outputs)
    group = Group(bench.layout, rows, np.arange(len(rows), dtype=np.int64) * n_out)
    k = [bench.case.networks[n] for n in bench.names]
    program = build_program([group], k, bench.groups, len(rows) * n_out, tables[0].device,
                            tables[0].dtype)  # fmt: skip
    return run_program(program, tables).view(len(rows), n_out)  # (B, n_outputs)


def klay_step(bench: Bench, rows: np.ndarray, tables: list[torch.Tensor]) -> torch.Tensor:
    """KLay's outputs (B, n_outputs) on the same rows and tables."""
    start, k = bench.atom_tables()
    index = klay_leaf_index(bench.klay, rows, start, k)
    flat = torch.cat([t.reshape(-1) for t in tables])  # (sum n * K,)
    return klay_forward(bench.klay, flat, torch.from_numpy(index).to(flat.device))


def tables_and_rows(bench: Bench, batch: int, dtype: torch.dtype, device: torch.device,
                    seed: int) -> tuple[list[torch.Tensor], np.ndarray]:  # fmt: skip
    """Seeded softmax tables (ROWS, K) per network, leaves; B instances' random rows."""
    gen = torch.Generator().manual_seed(seed)
    tables = [torch.softmax(2 * torch.randn(ROWS, bench.case.networks[n], generator=gen,
                                            dtype=torch.float64), -1)
              .to(device=device, dtype=dtype).requires_grad_() for n in bench.names]  # fmt: skip
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, ROWS, size=(batch, len(bench.layout.atoms)), dtype=np.int64)
    return tables, rows


def _grads(step: Callable, bench: Bench, rows: np.ndarray, tables: list[torch.Tensor],
           weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    for t in tables:
        t.grad = None
    out = step(bench, rows, tables)  # (B, n_outputs)
    (out * weights).sum().backward()
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tables]


def check_equal(bench: Bench, device: torch.device, tol: float = 1e-9) -> float:
    """Values and table gradients of ours and KLay in float64, on 64 instances; exits if they
    differ by more than ``tol``. Returns the largest difference."""
    tables, rows = tables_and_rows(bench, 64, torch.float64, device, seed=1)
    n_out = len(bench.layout.circuit.outputs)
    weights = torch.linspace(1, 2, 64 * n_out, dtype=torch.float64, device=device).view(64, n_out)
    ours, ours_g = _grads(ours_step, bench, rows, tables, weights)
    theirs, theirs_g = _grads(klay_step, bench, rows, tables, weights)
    worst = (ours - theirs).abs().max().item()
    for a, b in zip(ours_g, theirs_g):
        worst = max(worst, (a - b).abs().max().item())
    if not worst <= tol:
        raise SystemExit(f"{bench.case.name}: ours and KLay differ by {worst:.3g} (> {tol}) in "
                         f"values or gradients; the circuits do not agree")  # fmt: skip
    return worst


def time_step(step: Callable, bench: Bench, rows: np.ndarray, tables: list[torch.Tensor],
              device: torch.device) -> float:  # fmt: skip
    """Seconds of one forward + backward (sum of the outputs) to the tables."""
    for t in tables:
        t.grad = None
    start = time.perf_counter()
    step(bench, rows, tables).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_case(bench: Bench, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds (ours, KLay) of forward + backward at one batch size, alternating."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bench = replace(bench, klay=bench.klay.on(device, dtype))  # weight maps in the tables' dtype
    tables, rows = tables_and_rows(bench, batch, dtype, device, seed=2)
    times: dict[str, list[float]] = {"ours": [], "klay": []}
    for repeat in range(args.warmup + args.repeats):
        for name, step in (("ours", ours_step), ("klay", klay_step)):
            seconds = time_step(step, bench, rows, tables, device)
            if repeat >= args.warmup:
                times[name].append(seconds)
    return statistics.median(times["ours"]), statistics.median(times["klay"])


# --------------------------------------------------------------------------- mixed templates


@dataclass
class Mixed:
    """A training batch: B ground N-digit addition queries, each sum its own template."""

    name: str
    n_digits: int
    benches: dict[int, Bench]  # sum -> its template's bench

    def instances(self, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(sums (B,), rows (B, 2N)): random digit images, the sum of their labels."""
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, ROWS, size=(batch, 2 * self.n_digits), dtype=np.int64)
        labels = rng.integers(0, 10, size=(batch, 2 * self.n_digits))  # (B, 2N)
        place = 10 ** np.arange(self.n_digits - 1, -1, -1)  # (N,) most significant first
        sums = labels[:, : self.n_digits] @ place + labels[:, self.n_digits :] @ place
        return sums, rows

    def split(self, sums: np.ndarray, rows: np.ndarray) -> list[tuple[Bench, np.ndarray, Any]]:
        """Per sum in the batch: its bench, its instances, their rows per layout atom."""
        parts = []
        for total in np.unique(sums):
            bench = self.benches[int(total)]
            idx = np.flatnonzero(sums == total)
            slots = [slot for _, slot, _ in bench.layout.atoms]
            parts.append((bench, idx, rows[idx][:, slots]))
        return parts


def mixed(klay: Any, n_digits: int, args: argparse.Namespace) -> Mixed:
    """Benches for every sum of N-digit addition (each compiled once, ours from the cache)."""
    text = ROOT / "programs" / ("addition.pl" if n_digits == 1 else "multi_addition.pl")
    a = list2term([img(i) for i in range(n_digits)])
    b = list2term([img(n_digits + i) for i in range(n_digits)])
    benches = {}
    for total in range(2 * 10**n_digits - 1):
        query = (Term("addition", img(0), img(1), Constant(total)) if n_digits == 1
                 else Term("add", a, b, Constant(total)))  # fmt: skip
        case = Case(f"sum {total}", text.read_text(), {"digit_net": 10}, query)
        benches[total] = make_bench(klay, case, args.cache_dir, args.compile)
    return Mixed(f"{n_digits}-digit, mixed sums", n_digits, benches)


def ours_mixed(parts: list, n: int, tables: list[torch.Tensor]) -> torch.Tensor:
    """Ours: every template of the batch in one program, as CompiledLogic.query_probs. (B,)"""
    first = parts[0][0]
    groups = [Group(bench.layout, rows, idx) for bench, idx, rows in parts]
    k = [first.case.networks[name] for name in first.names]
    program = build_program(groups, k, first.groups, n, tables[0].device, tables[0].dtype)
    return run_program(program, tables)  # (B,)


def klay_mixed(parts: list, n: int, tables: list[torch.Tensor]) -> torch.Tensor:
    """KLay: one module call per template of the batch, outputs put back in query order. (B,)"""
    values = [klay_step(bench, rows, tables)[:, 0] for bench, _, rows in parts]  # (B_t,) each
    order = torch.from_numpy(np.concatenate([idx for _, idx, _ in parts])).to(values[0].device)
    return torch.cat(values).new_zeros(n).index_copy(0, order, torch.cat(values))  # (B,)


def time_mixed(mix: Mixed, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds (ours, KLay) of forward + backward of one mixed batch; checks first that
    the two agree (float64, 1e-9) on it."""
    device = torch.device(args.device)
    sums, rows = mix.instances(batch, seed=4)
    parts = mix.split(sums, rows)
    results = {}
    for dtype in (torch.float64, getattr(torch, args.dtype)):
        probs = torch.softmax(2 * torch.randn(ROWS, 10, generator=torch.Generator().manual_seed(5),
                                              dtype=torch.float64), -1)  # fmt: skip
        table = probs.to(device=device, dtype=dtype).requires_grad_()
        cast = [(replace(b, klay=b.klay.on(device, dtype)), i, r) for b, i, r in parts]
        times: dict[str, list[float]] = {"ours": [], "klay": []}
        for _ in range(args.warmup + args.repeats):
            for name, step in (("ours", ours_mixed), ("klay", klay_mixed)):
                table.grad = None
                start = time.perf_counter()
                out = step(cast, batch, [table])  # (B,)
                out.sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                results[(dtype, name)] = (out.detach(), table.grad.clone())
    worst = max((results[(torch.float64, "ours")][i] - results[(torch.float64, "klay")][i])
                .abs().max().item() for i in (0, 1))  # fmt: skip
    if not worst <= 1e-9:
        raise SystemExit(f"{mix.name}: ours and KLay differ by {worst:.3g} (> 1e-9)")
    return tuple(statistics.median(times[n][args.warmup :]) for n in ("ours", "klay"))


# --------------------------------------------------------------------------- other semirings


def semiring_points(klay: Any, bench: Bench, args: argparse.Namespace) -> None:
    """KLay's log and MPE semirings on one circuit (batch 128): time, and what they answer.

    log: the same probabilities from log weights (``log(c + m @ leaves)``), against real.
    mpe: per answer the weight of its most probable world; its argmax is the sum of the most
    probable digit assignment, which can differ from our best answer (argmax of the marginal).
    """
    device = torch.device(args.device)
    tables, rows = tables_and_rows(bench, 128, torch.float64, device, seed=3)
    tables = [t.detach() for t in tables]
    start, k = bench.atom_tables()
    index = torch.from_numpy(klay_leaf_index(bench.klay, rows, start, k)).to(device)
    flat = torch.cat([t.reshape(-1) for t in tables])
    leaves = flat.index_select(0, index.reshape(-1)).view(index.shape)  # (B, L)
    pos = bench.klay.pos_c.to(device) + leaves @ bench.klay.pos_m.to(device)  # (B, V)
    neg = bench.klay.neg_c.to(device) + leaves @ bench.klay.neg_m.to(device)  # (B, V)
    real = ours_step(bench, rows, tables).detach()  # (B, A) marginal of each answer
    for semiring in ("log", "mpe"):
        module = bench.klay.module_for(semiring, device)
        # log: an AD's weight 1 - sum p can round below 0 (see gedi_nesy.logic.batch): log 0
        x_pos, x_neg = (pos, neg)  # (B, V)
        if semiring == "log":
            x_pos, x_neg = pos.clamp_min(0).log(), neg.clamp_min(0).log()  # (B, V)
        seconds = []
        for _ in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = module(x_pos, x_neg)  # (B, n_roots)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        median = statistics.median(seconds[args.warmup :]) * 1e3
        if semiring == "log":
            log_p = out[:, :-1] - out[:, -1:]  # (B, A) log answer - log constraints
            worst = (log_p.exp() - real).abs().max().item()
            print(f"log semiring, {bench.case.name}, batch 128: {median:.2f} ms forward; "
                  f"exp(log p) - p up to {worst:.1e}")  # fmt: skip
        else:
            agree = (out[:, :-1].argmax(1) == real.argmax(1)).float().mean().item()
            print(f"mpe semiring, {bench.case.name}, batch 128: {median:.2f} ms forward; its "
                  f"argmax (most probable world's sum) = our best answer (argmax of the "
                  f"marginal) on {agree:.0%} of the instances")  # fmt: skip


# --------------------------------------------------------------------------- main


def klay_or_exit() -> Any:
    """The klay package, or exit with the one line that says how to get it."""
    try:
        import klay
    except ImportError:
        raise SystemExit("KLay is not installed: pip install klaycircuits") from None
    return klay


def report(rows: list[tuple[str, str, int, float, float]]) -> None:
    """The markdown table: circuit, sizes, batch, ms ours, ms KLay, KLay / ours."""
    print("\n| circuit | ours: terms, levels / KLay: nodes, layers | batch | ours ms | KLay ms "
          "| KLay / ours |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, sizes, batch, ours, theirs in rows:
        print(f"| {name} | {sizes} | {batch} | {ours * 1e3:.3f} | {theirs * 1e3:.3f} | "
              f"{theirs / ours:.2f} |")  # fmt: skip


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the timed runs (the check is float64)")  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="KLay's default torch.compile of its module (off: eager)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="circuit names to run")
    parser.add_argument(
        "--mixed",
        type=int,
        nargs="*",
        default=[1, 2],
        help="digits of the mixed-sum batches (a training batch's templates)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/gedi_circuits"),
                        help="our compiled circuits folder")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    klay = klay_or_exit()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    results = []
    for case in cases():
        if args.only and case.name not in args.only:
            continue
        bench = make_bench(klay, case, args.cache_dir, args.compile)
        bench.klay = bench.klay.on(device)
        worst = check_equal(bench, device)
        c = bench.layout.circuit
        sizes = f"{len(c.term_op)}, {c.n_levels} / {bench.klay.n_nodes}, {bench.klay.n_layers}"
        print(f"{case.name}: ours {sizes.split(' / ')[0]}, KLay {sizes.split(' / ')[1]}; "
              f"equal to {worst:.1e} in float64", flush=True)  # fmt: skip
        for batch in args.batches:
            results.append((case.name, sizes, batch, *time_case(bench, batch, args)))
            print(f"  batch {batch}: ours {results[-1][3] * 1e3:.3f} ms, KLay "
                  f"{results[-1][4] * 1e3:.3f} ms", flush=True)  # fmt: skip
        if case.name.startswith("2-digit, all"):
            semiring_points(klay, bench, args)
    for n_digits in args.mixed:
        mix = mixed(klay, n_digits, args)
        for batch in args.batches:
            results.append((mix.name, "one template per sum", batch, *time_mixed(mix, batch, args)))
            print(f"  {mix.name}, batch {batch}: ours {results[-1][3] * 1e3:.3f} ms, KLay "
                  f"{results[-1][4] * 1e3:.3f} ms", flush=True)  # fmt: skip
    report(results)


if __name__ == "__main__":
    main()
