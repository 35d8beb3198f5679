"""Logic speed: DeepProbLog's stock training step vs compiled, batched logic.

One process, one torch thread, the same random 28x28 inputs through the same small CNN, batch 32,
three engines:

* stock: DeepProbLog's ``train_model`` step (``TrainObject.get_loss``: ``Model.solve`` with the
  exact engine and its circuit cache, ``GraphSemiring.cross_entropy`` and a backward per query;
  the CNN runs once per query), then the optimiser step;
* bridge: :class:`gedi_nesy.logic.dpl.LogicModel` as the trainer uses it (one CNN forward over the
  batch's images, DeepProbLog's solver on lookup tables, ``logic_loss``, one backward);
* compiled: the same step with :class:`gedi_nesy.logic.compiled.CompiledLogic`.

Tasks: single-digit (``programs/addition.pl``) and two-digit (``programs/multi_addition.pl``)
addition, the full step and the logic alone (``query_probs`` + backward on fixed tables); then
test-time evaluation of all 199 sums of two-digit addition (stock: ``solve`` of the query with its
sum a variable, per query, as DeepProbLog's ``get_confusion_matrix``; bridge and compiled:
``best_answers``). Every engine first runs each batch once untimed (grounding, compilation,
caches); the second pass is timed. The compiled side keeps its circuits in ``--cache-dir`` (the
first run compiles them).

Four-digit addition (``--batches-4``, ``--stock-4``): DeepProbLog's step on single queries, each
timed the first time its sum is seen, as in an epoch, where most of the 19,999 sums are new to its
cache; against :class:`gedi_nesy.logic.chain.ColumnChainLogic`
(``logic.engine: column_chain``), timed as above. ``--ratio B``: two-digit logic against the
network's forward + backward at batch 32 and 256, B timed batches each, and their ratio. Example:

    python benchmarks/logic_speed.py --batches-1 4 --batches-2 1 --eval-stock 1 --batches-4 4
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from deepproblog.engines import ExactEngine
from deepproblog.model import Model
from deepproblog.network import Network
from deepproblog.query import Query
from deepproblog.semiring.graph_semiring import GraphSemiring
from deepproblog.train import TrainObject
from problog.logic import Constant, Term, list2term

from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.program import ProbabilityTable, tensor_keys
from gedi_nesy.train.joint import logic_loss

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
NETWORKS = {"digit_net": 10}


class SmallCNN(nn.Module):
    """DeepProbLog's MNIST_Net: two conv layers, three linear layers, softmax over 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.MaxPool2d(2, 2), nn.ReLU(True),
            nn.Conv2d(6, 16, 5), nn.MaxPool2d(2, 2), nn.ReLU(True),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x.view(-1, 1, 28, 28))  # (B, 16, 4, 4)
        return torch.softmax(self.classifier(x.flatten(1)), -1)  # (B, 10)


class ImageSource:
    """DeepProbLog tensor source: ``tensor(img(i))`` -> image i."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __getitem__(self, args: tuple) -> torch.Tensor:
        return self.images[int(args[0])]


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def make_query(n_digits: int, labels: Sequence[int], rng: random.Random) -> Query:
    """One addition query with placeholders + substitution, as DeepProbLog's MNIST example."""
    ids = [rng.randrange(len(labels)) for _ in range(2 * n_digits)]
    names = [Term(f"p{i}") for i in range(2 * n_digits)]
    subs = {name: img(i) for name, i in zip(names, ids)}
    numbers = [sum(labels[i] * 10 ** (n_digits - 1 - j) for j, i in enumerate(half))
               for half in (ids[:n_digits], ids[n_digits:])]  # fmt: skip
    if n_digits == 1:
        term = Term("addition", names[0], names[1], Constant(sum(numbers)))
    else:
        a, b = list2term(names[:n_digits]), list2term(names[n_digits:])
        term = Term("add", a, b, Constant(sum(numbers)))
    return Query(term, subs)


def stock_model(program: Path, cnn: nn.Module, images: torch.Tensor) -> Model:
    """DeepProbLog as its examples build it: exact engine, circuit cache, batching network."""
    optimizer = torch.optim.Adam(cnn.parameters(), lr=1e-3)
    model = Model(str(program), [Network(cnn, "digit_net", optimizer, batching=True)])
    model.set_engine(ExactEngine(model), cache=True)
    model.add_tensor_source("img", ImageSource(images))
    return model


def stock_step(model: Model, trainer: TrainObject, batch: Sequence[Query]) -> None:
    """The body of DeepProbLog's training loop (train.py: TrainObject.train)."""
    model.train()
    model.optimizer.zero_grad()
    trainer.get_loss(batch, GraphSemiring.cross_entropy)  # backward per query, inside
    model.optimizer.step()


def table_step(
    logic: LogicModel | CompiledLogic, cnn: nn.Module, optimizer: torch.optim.Optimizer,
    images: torch.Tensor, batch: Sequence[Query], device: torch.device,
) -> None:  # fmt: skip
    """The trainer's step: one CNN forward over the batch's images, the logic, one backward."""
    keys = tensor_keys(batch)
    x = torch.stack([images[int(k.args[0].args[0])] for k in keys]).to(device)  # (n, 1, 28, 28)
    table = ProbabilityTable(keys, cnn(x))  # (n, 10)
    probs, provable = logic.query_probs(batch, {"digit_net": table})  # (Q,), (Q,)
    optimizer.zero_grad()
    logic_loss(probs, provable.to(probs.device)).backward()
    optimizer.step()


def time_table_engine(
    logic: LogicModel | CompiledLogic, cnn: nn.Module, images: torch.Tensor, batches: list,
    device: torch.device,
) -> float:  # fmt: skip
    """Seconds per batch of :func:`table_step` with a fresh copy of the CNN and optimiser."""
    net = copy.deepcopy(cnn).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    return seconds_per_batch(
        lambda b: table_step(logic, net, optimizer, images, b, device), batches
    )


def seconds_per_batch(step: Callable[[Sequence[Query]], None], batches: list) -> float:
    """Run every batch once untimed (compilation, caches), then time a second pass."""
    for batch in batches:
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return (time.perf_counter() - start) / len(batches)


def bench_training(n_digits: int, n_batches: int, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    labels = [rng.randrange(10) for _ in range(args.images)]
    images = torch.rand(args.images, 1, 28, 28)  # random inputs; the labels only pick the sums
    batches = [[make_query(n_digits, labels, rng) for _ in range(args.batch)]
               for _ in range(n_batches)]  # fmt: skip
    program = PROGRAMS / ("addition.pl" if n_digits == 1 else "multi_addition.pl")
    torch.manual_seed(args.seed)
    cnn = SmallCNN()
    model = stock_model(program, copy.deepcopy(cnn), images)
    trainer = TrainObject(model)
    times = {"stock": seconds_per_batch(lambda b: stock_step(model, trainer, b), batches)}
    cpu, device = torch.device("cpu"), torch.device(args.device)
    bridge = LogicModel(program, NETWORKS)
    times["bridge"] = time_table_engine(bridge, cnn, images, batches, cpu)
    logic = CompiledLogic(program, NETWORKS, cache_dir=args.cache_dir)
    start = time.perf_counter()
    n_templates = logic.prepare([q for b in batches for q in b])
    prepare = time.perf_counter() - start
    times["compiled"] = time_table_engine(logic, cnn, images, batches, device)
    logic_only = {name: time_logic(engine, batches) for name, engine in
                  (("bridge", bridge), ("compiled", logic))}  # fmt: skip
    print(f"train {n_digits}-digit, {n_batches} x {args.batch} queries ({n_templates} templates, "
          f"compiled side ready in {prepare:.1f} s, {logic.stats})")  # fmt: skip
    report("  step (CNN + logic + step)", times, args.batch)
    report("  logic only (fixed tables)", logic_only, args.batch)


def time_logic(logic: LogicModel | CompiledLogic, batches: list) -> float:
    """Seconds per batch of the logic alone: query_probs + backward on fixed random tables."""
    keys = tensor_keys([q for batch in batches for q in batch])
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(len(keys), 10, generator=gen), -1).requires_grad_()
    tables = {"digit_net": ProbabilityTable(keys, probs)}  # (n, 10) leaf

    def step(batch: Sequence[Query]) -> None:
        logic_loss(*logic.query_probs(batch, tables)).backward()

    return seconds_per_batch(step, batches)


def time_network(net: nn.Module, batches: list, images: torch.Tensor) -> float:
    """Seconds per batch of the network alone: one forward over the batch's images and one
    backward (of a stand-in loss), as the joint step runs it."""

    def step(batch: Sequence[Query]) -> None:
        keys = tensor_keys(batch)
        x = images[[int(k.args[0].args[0]) for k in keys]]  # (n, 1, 28, 28)
        net.zero_grad()
        torch.log_softmax(net(x), -1).mean().backward()  # (n, 10) -> ()

    return seconds_per_batch(step, batches)


def bench_ratio(args: argparse.Namespace) -> None:
    """Two-digit addition: the compiled logic (query_probs + backward on fixed tables) against
    the network's forward + backward (the CLI's GEDINet and DeepProbLog's MNIST CNN) on the same
    batches, at batch 32 and 256; prints logic / network."""
    rng = random.Random(args.seed + 2)
    labels = [rng.randrange(10) for _ in range(args.images)]
    images = torch.rand(args.images, 1, 28, 28) * 2 - 1  # (n, 1, 28, 28)
    logic = CompiledLogic(PROGRAMS / "multi_addition.pl", NETWORKS, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)
    nets = {"GEDINet": GEDINet(k=10), "MNIST CNN": SmallCNN()}
    for batch in (32, 256):
        batches = [[make_query(2, labels, rng) for _ in range(batch)] for _ in range(args.ratio)]
        logic.prepare([q for b in batches for q in b])
        seconds = time_logic(logic, batches)
        for name, net in nets.items():
            network = time_network(net, batches, images)
            print(f"ratio 2-digit, batch {batch}: logic {seconds:.4f} s, {name} forward + "
                  f"backward {network:.4f} s; logic / network = "
                  f"{seconds / network:.2f}")  # fmt: skip


def report(what: str, seconds: dict[str, float], batch: int) -> None:
    """One line: seconds per 100 queries of each engine, and how much faster compiled is."""
    line = ", ".join(f"{k} {v * 100 / batch:.4f}" for k, v in seconds.items())
    ratios = ", ".join(f"{seconds[k] / seconds['compiled']:.0f}x {k}" for k in seconds
                       if k != "compiled")  # fmt: skip
    print(f"{what}, s / 100 queries: {line}; compiled is {ratios}")


def bench_eval(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed + 1)
    labels = [rng.randrange(10) for _ in range(args.images)]
    images = torch.rand(args.images, 1, 28, 28)
    queries = [make_query(2, labels, rng) for _ in range(max(args.eval_stock, args.eval_ours))]
    program = PROGRAMS / "multi_addition.pl"
    torch.manual_seed(args.seed)
    cnn = SmallCNN()
    model = stock_model(program, copy.deepcopy(cnn), images)
    model.eval()
    with torch.no_grad():
        stock = seconds_per_batch(lambda b: model.solve([b[0].variable_output()]),
                                  [[q] for q in queries[: args.eval_stock]])  # fmt: skip
        bridge = LogicModel(program, NETWORKS)
        bridge_s = (
            seconds_per_batch(
                lambda b: predict(bridge, cnn, images, b, torch.device("cpu")),
                [queries[: args.eval_stock]],
            )
            / args.eval_stock
        )
        device = torch.device(args.device)
        logic = CompiledLogic(program, NETWORKS, cache_dir=args.cache_dir)
        ours_cnn = copy.deepcopy(cnn).to(device).eval()
        ours = (
            seconds_per_batch(
                lambda b: predict(logic, ours_cnn, images, b, device), [queries[: args.eval_ours]]
            )
            / args.eval_ours
        )
    print(f"eval 2-digit, all 199 sums, s / query: stock {stock:.3f} ({args.eval_stock} "
          f"queries), bridge {bridge_s:.3f}, compiled {ours:.6f} ({args.eval_ours} queries, "
          f"one call); compiled is {stock / ours:.0f}x stock, {bridge_s / ours:.0f}x "
          "bridge")  # fmt: skip


def predict(
    logic: LogicModel | CompiledLogic, cnn: nn.Module, images: torch.Tensor,
    batch: Sequence[Query], device: torch.device,
) -> None:  # fmt: skip
    """The trainer's evaluation: one CNN forward, the most probable sum of each query."""
    keys = tensor_keys(batch)
    x = torch.stack([images[int(k.args[0].args[0])] for k in keys]).to(device)  # (n, 1, 28, 28)
    logic.best_answers(batch, {"digit_net": ProbabilityTable(keys, cnn(x))})


def bench_four(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed + 4)
    labels = [rng.randrange(10) for _ in range(args.images)]
    images = torch.rand(args.images, 1, 28, 28)
    batches = [[make_query(4, labels, rng) for _ in range(args.batch)]
               for _ in range(args.batches_4)]  # fmt: skip
    program = PROGRAMS / "multi_addition.pl"
    torch.manual_seed(args.seed)
    cnn = SmallCNN()
    model = stock_model(program, copy.deepcopy(cnn), images)
    trainer = TrainObject(model)
    fresh = [[q] for q in batches[0][: args.stock_4]]  # each query's sum seen for the first time
    start = time.perf_counter()
    for batch in fresh:
        stock_step(model, trainer, batch)
    stock = (time.perf_counter() - start) / len(fresh)  # seconds per query
    start = time.perf_counter()
    logic = ColumnChainLogic(CompiledLogic(program, NETWORKS, cache_dir=args.cache_dir))
    ready = time.perf_counter() - start
    device = torch.device(args.device)
    chain = time_table_engine(logic, cnn, images, batches, device) / args.batch  # s per query
    per_epoch = 7000  # training sums of configs/mnist_addition4.yaml
    print(f"train 4-digit: stock {stock:.3f} s / query ({len(fresh)} queries, each sum new), "
          f"column chain {chain:.5f} s / query ({args.batches_4} x {args.batch}; engine ready in "
          f"{ready:.1f} s, {logic.logic.stats}); chain is {stock / chain:.0f}x stock; an epoch of "
          f"{per_epoch} sums: stock {stock * per_epoch / 3600:.1f} h, chain "
          f"{chain * per_epoch / 60:.1f} min")  # fmt: skip


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches-1", type=int, default=4, help="timed single-digit batches")
    parser.add_argument("--batches-2", type=int, default=1, help="timed two-digit batches")
    parser.add_argument("--eval-stock", type=int, default=1, help="stock evaluation queries")
    parser.add_argument("--eval-ours", type=int, default=64, help="compiled evaluation queries")
    parser.add_argument("--batches-4", type=int, default=0, help="timed four-digit batches")
    parser.add_argument("--stock-4", type=int, default=2, help="stock four-digit queries")
    parser.add_argument("--ratio", type=int, default=0, help="timed batches of the logic/network"
                        " ratio (two digits, batch 32 and 256)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device of the compiled side")
    parser.add_argument("--cache-dir", type=Path, default=None, help="compiled circuits folder")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.batches_1 > 0:
        bench_training(1, args.batches_1, args)
    if args.batches_2 > 0:
        bench_training(2, args.batches_2, args)
    if args.eval_stock > 0 and args.eval_ours > 0:
        bench_eval(args)
    if args.batches_4 > 0:
        bench_four(args)
    if args.ratio > 0:
        bench_ratio(args)


if __name__ == "__main__":
    main()
