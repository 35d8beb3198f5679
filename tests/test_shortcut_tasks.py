"""MNIST-EvenOdd and MNIST-Half builders on fake MNIST files in a temp folder; never download.

Fake image i has every pixel equal to i, so a source image tells which file image it is; fake
label i is ``i mod 10``. Train has 3 images per digit, test 2.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gedi_nesy.errors import ConfigError, DataError
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.program import ProbabilityTable
from tasks import TASKS, mnist_evenodd, mnist_half, worlds

PER_DIGIT = {"train": 3, "test": 2}
PREFIX = {"train": "train", "test": "t10k"}
SMALL = {"n_train_per_world": 2, "n_val_per_world": 1, "n_test_per_world": 3}
MODULES = {"mnist_evenodd": mnist_evenodd, "mnist_half": mnist_half}
WORLD_TASKS = {"mnist_evenodd": mnist_evenodd.EVENODD, "mnist_half": mnist_half.HALF}


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """IDX encoding: big-endian int32 magic and dims, then the uint8 payload."""
    return np.array([magic, *array.shape], dtype=">i4").tobytes() + array.tobytes()


def write_fake_mnist(root: Path, missing_digit: int | None = None) -> Path:
    """Uncompressed fake ``root/MNIST/raw``: image i is all pixels i, label i mod 10."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, per_digit in PER_DIGIT.items():
        n = 10 * per_digit
        labels = (np.arange(n) % 10).astype(np.uint8)  # (n,)
        if missing_digit is not None:
            labels[labels == missing_digit] = (missing_digit + 1) % 10
        images = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
        (raw / f"{PREFIX[split]}-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x803))
        (raw / f"{PREFIX[split]}-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x801))
    return root


def file_index(images: torch.Tensor) -> torch.Tensor:
    """Which fake file image each source image is: (N, 1, 28, 28) in [-1, 1] -> (N,)."""
    return ((images[:, 0, 0, 0] + 1.0) * 127.5).round().long()  # (N,)


def build(name: str, root: Path, **params: int):
    return MODULES[name].build({"name": name, **params}, str(root), verify_official=False)


def query_parts(query) -> tuple[str, list[int], int]:
    """(source, image indices, label) of ``addition(p0_0, p1_0, S)`` with its substitution."""
    terms = [query.substitution[arg] for arg in query.query.args[:2]]
    source = {str(t.args[0].functor) for t in terms}
    assert len(source) == 1
    return source.pop(), [int(t.args[0].args[0]) for t in terms], int(query.query.args[2])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("fake"))


def test_registered():
    assert TASKS["mnist_evenodd"] == "tasks.mnist_evenodd:build"
    assert TASKS["mnist_half"] == "tasks.mnist_half:build"


def test_world_lists_are_the_published_ones():
    assert mnist_evenodd.TRAIN_WORLDS == [
        (0, 6), (6, 0), (2, 8), (8, 2), (4, 6), (6, 4), (4, 8), (8, 4),
        (1, 5), (5, 1), (3, 7), (7, 3), (1, 9), (9, 1), (3, 9), (9, 3),
    ]  # fmt: skip
    assert mnist_half.TRAIN_WORLDS == [(0, 0), (0, 1), (1, 0), (2, 3), (3, 2), (2, 4), (4, 2)]
    assert {a + b for a, b in mnist_evenodd.TRAIN_WORLDS} == {6, 10, 12}
    assert {a + b for a, b in mnist_half.TRAIN_WORLDS} == {0, 1, 5, 6}
    for task, n_ood, digits in ((mnist_evenodd.EVENODD, 84, 10), (mnist_half.HALF, 18, 5)):
        ood = worlds.ood_worlds(task)
        assert len(ood) == n_ood and not set(ood) & set(task.train_worlds)
        assert sorted(ood + task.train_worlds) == worlds.all_worlds(range(digits))


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("mnist_evenodd", (6720, 1920, 960, 5040)), ("mnist_half", (2940, 840, 420, 1080))],
)
def test_default_sizes(root: Path, name: str, sizes: tuple[int, int, int, int]):
    task = build(name, root)
    assert (len(task.train), len(task.val), len(task.test), len(task.ood_test)) == sizes
    assert task.ood_concept_images == "oodtest"
    assert task.ood_concept_labels.shape == (2 * sizes[3],)
    assert task.info["n_train_queries"] == sizes[0] and task.info["n_ood_test"] == sizes[3]
    assert task.sources["idtest"].shape == (2 * sizes[2], 1, 28, 28)
    assert task.sources["oodtest"].shape == (2 * sizes[3], 1, 28, 28)
    assert task.concept_images == "idtest" and task.concept_labels.shape == (2 * sizes[2],)


@pytest.mark.parametrize("name", ["mnist_evenodd", "mnist_half"])
def test_train_and_val_queries_follow_their_worlds(root: Path, name: str):
    task = build(name, root, **SMALL)
    train_y = torch.arange(30) % 10  # fake labels of MNIST-train
    worlds = MODULES[name].TRAIN_WORLDS
    for split, n in (("train", 2), ("val", 1)):
        seen = Counter()
        for query in getattr(task, split):
            source, images, label = query_parts(query)
            digits = tuple(train_y[images].tolist())
            assert source == "train" and label == sum(digits) and digits in worlds
            seen[digits] += 1
        assert seen == dict.fromkeys(worlds, n)


@pytest.mark.parametrize("name", ["mnist_evenodd", "mnist_half"])
def test_test_sources_hold_the_right_digits(root: Path, name: str):
    task = build(name, root, **SMALL)
    test_y = torch.arange(20) % 10  # fake labels of MNIST-test
    ood_worlds = worlds.ood_worlds(WORLD_TASKS[name])
    for source, queries, labels, in_order in (
        ("idtest", task.test, task.concept_labels, MODULES[name].TRAIN_WORLDS),
        ("oodtest", task.ood_test, task.ood_concept_labels, ood_worlds),
    ):
        assert test_y[file_index(task.sources[source])].tolist() == labels.tolist()
        pairs = labels.view(-1, 2)  # (Q, 2)
        assert [tuple(p) for p in pairs[::3].tolist()] == in_order  # 3 samples per world
        for q, query in enumerate(queries):
            assert query_parts(query) == (source, [2 * q, 2 * q + 1], int(pairs[q].sum()))
    assert task.ood_concept_images == "oodtest"


def test_half_uses_digits_0_to_4_only(root: Path):
    task = build("mnist_half", root, **SMALL)
    used = [query_parts(q)[1] for q in task.train + task.val]
    assert set((torch.tensor(used) % 10).view(-1).tolist()) <= set(range(5))
    assert int(task.concept_labels.max()) <= 4 and int(task.ood_concept_labels.max()) == 4
    assert task.networks == {"digit_net": 5} and task.program.name == "half_addition.pl"


def test_seed_reproducibility(root: Path):
    def draws(seed: int) -> tuple[list, list, list]:
        task = build("mnist_evenodd", root, seed=seed, **SMALL)
        return (
            [query_parts(q)[1] for q in task.train + task.val],
            file_index(task.sources["idtest"]).tolist(),
            file_index(task.sources["oodtest"]).tolist(),
        )

    assert draws(3) == draws(3)
    assert all(a != b for a, b in zip(draws(3), draws(4)))


@pytest.mark.parametrize(
    ("name", "digest"), [("mnist_evenodd", "392c2cb383bfad31"), ("mnist_half", "9ea80519d9707a0d")]
)
def test_draws_are_those_of_the_code_before_tasks_worlds(root: Path, name: str, digest: str):
    # the digests were taken with tasks/mnist_evenodd.py of commit e3b2a6c, before the shared
    # sampling moved to tasks/worlds.py: the same seed draws the same images, bit for bit
    task = build(name, root, seed=3, **SMALL)
    parts = [query_parts(q) for q in task.train + task.val + task.test + task.ood_test]
    images = [file_index(task.sources[s]).tolist() for s in ("idtest", "oodtest")]
    labels = [task.concept_labels.tolist(), task.ood_concept_labels.tolist()]
    found = hashlib.sha256(repr((parts, images, labels)).encode()).hexdigest()[:16]
    assert found == digest


@pytest.mark.parametrize("name", ["mnist_evenodd", "mnist_half"])
def test_true_digits_prove_every_query(root: Path, name: str):
    task = build(name, root, n_train_per_world=1, n_val_per_world=0, n_test_per_world=1)
    k = task.networks["digit_net"]
    logic = LogicModel(task.program, task.networks)
    train_y = torch.arange(30) % 10
    for queries, labels in ((task.train, train_y), (task.test, task.concept_labels),
                            (task.ood_test, task.ood_concept_labels)):  # fmt: skip
        keys = sorted({t for q in queries for t in q.substitution.values()}, key=str)
        digits = torch.stack([labels[int(t.args[0].args[0])] for t in keys])  # (n_keys,)
        rows = torch.eye(k, dtype=torch.float64)[digits]  # (n_keys, K)
        table = {"digit_net": ProbabilityTable(keys, rows)}  # one-hot at the true digit
        assert logic.query_probs(queries, table).probs.tolist() == [1.0] * len(queries)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_train_per_world": 0}, "task.n_train_per_world = 0; it must be a finite number >= 1"),
        ({"n_val_per_world": -1}, "task.n_val_per_world = -1; it must be a finite number >= 0"),
        ({"n_test": 5}, "unknown config key 'task.n_test'"),
    ],
)
def test_bad_params(root: Path, params: dict, message: str):
    for name in MODULES:
        with pytest.raises(ConfigError, match=message):
            build(name, root, **params)


def test_missing_digit_is_a_data_error(tmp_path: Path):
    write_fake_mnist(tmp_path, missing_digit=7)
    with pytest.raises(DataError, match="none of digit 7"):
        build("mnist_evenodd", tmp_path, **SMALL)
    assert len(build("mnist_half", tmp_path, **SMALL).train) == 14  # Half needs no 7


def test_audit_specs():
    for module, k, n in ((mnist_evenodd, 10, 16), (mnist_half, 5, 7)):
        spec = module.audit_spec({})
        assert (spec.network, spec.domain_size, len(spec.worlds)) == ("digit_net", k, n)
        assert all(label == sum(digits) for digits, label in spec.worlds)
        assert [digits for digits, _ in spec.worlds] == module.TRAIN_WORLDS
