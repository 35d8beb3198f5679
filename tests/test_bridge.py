"""gedi_nesy.logic.dpl: program checks, lookup tables, query and answer probabilities, semiring.

Fixed table (tests/conftest.py): image 0 is digit 1 (0.4) or 2 (0.6); image 1 is 3 or 4 (0.5
each); image 2 is 0 (0.1) or 9 (0.9); image 3 is 7 (1.0); images 4-7 are dense.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.logic import Constant, Term, Var

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.dpl import ExactZeroSemiring, LogicModel
from gedi_nesy.logic.program import (
    NeuralDeclaration,
    ProbabilityTable,
    check_program,
    parse_neural_declarations,
)

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
DIGITS = {"digit_net": 10}

TWO_NETS = """\
nn(digit_net, [X], Y, [0, 1, 2]) :: digit(X, Y).
nn(sign_net, [X], S, [pos, "neg"]) :: sign(X, S) :- true.
q(A, B) :- digit(A, 1), sign(B, pos).
double(X, Z) :- digit(X, Y), Z is 2 * Y.
big(X, Z) :- digit(X, Z), Z > 5.
"""


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def addition(x: Term, y: Term, z: int) -> Query:
    return Query(Term("addition", x, y, Constant(z)))


@pytest.fixture(scope="module")
def adder() -> LogicModel:
    return LogicModel(PROGRAMS / "addition.pl", DIGITS)


@pytest.fixture(scope="module")
def two_nets() -> LogicModel:
    return LogicModel(TWO_NETS, {"digit_net": 3, "sign_net": 2})


def small_tables() -> dict[str, ProbabilityTable]:
    digit = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]], dtype=torch.float64)  # (2, 3)
    sign = torch.tensor([[0.7, 0.3], [0.25, 0.75]], dtype=torch.float64)  # (2, 2)
    keys = [img(0), img(1)]
    return {"digit_net": ProbabilityTable(keys, digit), "sign_net": ProbabilityTable(keys, sign)}


# --------------------------------------------------------------------------- program checks


def test_parse_neural_declarations():
    assert parse_neural_declarations(TWO_NETS) == [
        NeuralDeclaration("digit_net", "digit", 2, [0, 1, 2], line=1),
        NeuralDeclaration("sign_net", "sign", 2, ["pos", "neg"], line=2),
    ]


def test_syntax_error_names_file_line_and_column():
    with pytest.raises(ProgramError, match=r"^bad\.pl:2:7: Unmatched character"):
        parse_neural_declarations("a :- b.\nc :- d(\ne.\n", source="bad.pl")


@pytest.mark.parametrize(
    "statement, fragment",
    [
        ("nn(net, [X], Y) :: p(X, Y).", "is nn/3; gedi_nesy serves nn/4 only"),
        ("nn(net, [X, Z], Y, [0, 1]) :: p(X, Z, Y).", "one input per nn/4"),
        ("nn(net, [X], Y, D) :: p(X, Y, D).", "write a ground list"),
        ("nn(net, [X], Y, [0, 1]) :: p(X, Y); 0.5 :: q.", "sits in a ';' disjunction"),
    ],
)
def test_unsupported_nn_forms(statement, fragment):
    with pytest.raises(ProgramError, match=r"^p\.pl:2: .*" + fragment.replace("(", r"\(")):
        parse_neural_declarations("a.\n" + statement, source="p.pl")


PROGRAM = "nn(digit_net, [X], Y, [0, 1, 2]) :: digit(X, Y).\nq(X) :- digit(X, 1).\n"


@pytest.mark.parametrize(
    "networks, fragment",
    [
        ({"other": 3}, r"p\.pl:1: .*'digit_net', which is not registered; registered: \['other'\]"),
        ({"digit_net": 3, "extra": 5}, r"p\.pl: network 'extra' is registered but no nn/4 uses"),
        ({"digit_net": 10}, r"p\.pl:1: network 'digit_net' has K = 10 outputs but .* has 3 values"),
    ],
)
def test_check_program_errors(networks, fragment):
    with pytest.raises(ProgramError, match=fragment):
        check_program(PROGRAM, networks, source="p.pl")


def test_check_program_accepts_learnable_and_rejects_untrainable_probabilities():
    check_program(PROGRAM + "t(0.5) :: coin.\n", {"digit_net": 3}, source="p.pl")
    with pytest.raises(ProgramError, match=r"p\.pl:3: .* mixes t\(\.\.\.\) and fixed"):
        check_program(PROGRAM + "t(0.5)::h; 0.5::t.\n", {"digit_net": 3}, source="p.pl")


DIGIT_DOMAINS = {"half_addition.pl": 5}  # digits 0-4 (MNIST-Half); every other program: 0-9


def test_check_program_accepts_every_shipped_program():
    for path in sorted(PROGRAMS.glob("*.pl")):
        k = DIGIT_DOMAINS.get(path.name, 10)
        declarations = check_program(path.read_text(), {"digit_net": k}, source=str(path))
        assert [d.network for d in declarations] == ["digit_net"], path.name
        assert declarations[0].domain == list(range(k)), path.name


def test_program_from_path_or_text(tmp_path):
    path = tmp_path / "p.pl"
    path.write_text(PROGRAM)
    declarations = check_program(PROGRAM, {"digit_net": 3})
    assert LogicModel(path, {"digit_net": 3}).declarations == declarations
    assert LogicModel(PROGRAM, {"digit_net": 3}).source == "<program>"
    assert LogicModel(str(path), {"digit_net": 3}).source == str(path)  # a str path works too
    with pytest.raises(ProgramError, match="does not exist"):
        LogicModel(tmp_path / "missing.pl", {"digit_net": 3})
    with pytest.raises(ProgramError, match="does not exist"):
        LogicModel(str(tmp_path / "missing.pl"), {"digit_net": 3})


# --------------------------------------------------------------------------- tables


def test_probability_table_validates_its_shape():
    with pytest.raises(DataError, match=r"got 2 keys and probs of shape \(3, 10\)"):
        ProbabilityTable([img(0), img(1)], torch.rand(3, 10))
    with pytest.raises(DataError, match="only 1 distinct"):
        ProbabilityTable([img(0), img(0)], torch.rand(2, 10))


def test_missing_key_names_the_key(adder, digit_table):
    table = ProbabilityTable([img(0)], digit_table["digit_net"].probs[:1])  # no row for image 1
    with pytest.raises(DataError, match=r"has no row for tensor\(img\(1\)\)"):
        adder.query_probs([addition(img(0), img(1), 5)], {"digit_net": table})


def test_tables_are_unbound_after_a_failed_solve(adder, digit_table):
    table = ProbabilityTable([img(0)], digit_table["digit_net"].probs[:1])
    with pytest.raises(DataError):
        adder.query_probs([addition(img(0), img(1), 5)], {"digit_net": table})
    with pytest.raises(DataError, match="no probability table was given for it"):
        adder.query_probs([addition(img(0), img(0), 2)], {})


def test_table_for_an_unknown_network(adder):
    table = ProbabilityTable([img(0), img(1)], torch.full((2, 10), 0.1))
    with pytest.raises(DataError, match="table for 'other_net', but the registered networks are"):
        adder.query_probs([addition(img(0), img(1), 5)], {"other_net": table})


def test_table_with_the_wrong_number_of_columns(adder):
    table = ProbabilityTable([img(0), img(1)], torch.full((2, 9), 0.1))
    with pytest.raises(DataError, match="'digit_net' has 9 columns, the network has K = 10"):
        adder.query_probs([addition(img(0), img(1), 5)], {"digit_net": table})


# --------------------------------------------------------------------------- query_probs


def test_unprovable_queries_are_counted(adder, digit_table):
    out = adder.query_probs(
        [
            addition(img(0), img(1), 5),  # p = 0.5 = 0.4*0.5 + 0.6*0.5
            addition(img(0), img(1), 25),  # no proof: sums stop at 18
            addition(img(0), img(0), 3),  # p = 0: proved by digits 1 and 2 of one image
        ],
        digit_table,
    )
    assert out.probs.tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-12)
    assert out.provable.tolist() == [True, False, True]
    assert out.n_unprovable == 1
    probs, provable = out  # unpacks as (probs (Q,), provable (Q,))
    assert probs.shape == provable.shape == (3,)


def test_query_probs_rejects_free_variables(adder, digit_table):
    with pytest.raises(DataError, match="has free variables; query_probs needs ground"):
        adder.query_probs([Query(Term("addition", img(0), img(1), Var("Z")))], digit_table)


def test_substituted_queries_share_one_circuit(digit_table):
    logic = LogicModel(PROGRAMS / "addition.pl", DIGITS)
    a, b = Term("p0"), Term("p1")
    queries = [
        Query(Term("addition", a, b, Constant(5)), {a: img(0), b: img(1)}),  # p = 0.5
        Query(Term("addition", a, b, Constant(5)), {a: img(1), b: img(0)}),  # p = 0.5
        Query(Term("addition", a, b, Constant(16)), {a: img(2), b: img(3)}),  # p = 0.9
    ]
    out = logic.query_probs(queries, digit_table)
    assert out.probs.tolist() == pytest.approx([0.5, 0.5, 0.9], abs=1e-12)
    assert len(logic.model.solver.cache.cache_dict) == 2  # one circuit per sum


def test_aliased_substitution_counts_an_input_once(adder, digit_table):
    a, b = Term("p0"), Term("p1")
    query = Query(Term("addition", a, b, Constant(4)), {a: img(0), b: img(0)})
    # p = 0.6 = P(image 0 is 2); a circuit shared with independent p0, p1 would give 0.36
    assert adder.query_probs([query], digit_table).probs.tolist() == pytest.approx([0.6])


def test_two_networks_with_their_own_tables(two_nets):
    out = two_nets.query_probs([Query(Term("q", img(0), img(1)))], small_tables())
    assert out.probs.tolist() == pytest.approx([0.075])  # p = 0.075 = 0.3*0.25
    assert two_nets.referenced_keys([Query(Term("q", img(0), img(1)))]) == {
        "digit_net": [img(0)],
        "sign_net": [img(1)],
    }


def test_referenced_keys_apply_the_substitution(adder):
    a, b = Term("p0"), Term("p1")
    queries = [
        Query(Term("addition", a, b, Constant(5)), {a: img(6), b: img(7)}),
        Query(Term("addition", a, b, Constant(5)), {a: img(7), b: img(2)}),
    ]
    assert adder.referenced_keys(queries) == {"digit_net": [img(6), img(7), img(2)]}


def test_gradient_reaches_the_table(adder, digit_table, digit_probs):
    out = adder.query_probs([addition(img(0), img(1), 6)], digit_table)
    out.probs.sum().backward()  # p = sum_j P0(j) * P1(6 - j), so dp/dP0(j) = P1(6 - j)
    expected = torch.zeros_like(digit_probs)  # (8, 10)
    expected[0, 2] = 0.5  # P1(4)
    expected[0, 3] = 0.5  # P1(3)
    expected[1, 4] = 0.6  # P0(2)
    expected[1, 5] = 0.4  # P0(1)
    assert torch.allclose(digit_probs.grad, expected, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_flows_back_to_a_gpu_table(adder, digit_probs):
    gpu = digit_probs.detach().cuda().requires_grad_()  # (8, 10) on the GPU
    table = {"digit_net": ProbabilityTable([img(i) for i in range(8)], gpu)}
    adder.query_probs([addition(img(4), img(5), 9)], table).probs.sum().backward()
    cpu = {"digit_net": ProbabilityTable([img(i) for i in range(8)], digit_probs)}
    adder.query_probs([addition(img(4), img(5), 9)], cpu).probs.sum().backward()
    assert gpu.grad.device.type == "cuda"
    assert torch.allclose(gpu.grad.cpu(), digit_probs.grad, atol=1e-12)


# --------------------------------------------------------------------------- answers


def test_answers_and_best_answers(adder, two_nets, digit_table):
    query = addition(img(0), img(1), 0)  # the output argument is replaced by a variable
    with torch.no_grad():
        (dist,) = adder.answers([query], digit_table)
    # every sum 0..18 has a proof; 4 = 1+3 (0.2), 5 = 1+4 or 2+3 (0.5), 6 = 2+4 (0.3), others 0
    expected = {s: {4: 0.2, 5: 0.5, 6: 0.3}.get(s, 0.0) for s in range(19)}
    assert {int(k): float(v) for k, v in dist.items()} == pytest.approx(expected, abs=1e-12)
    assert adder.best_answers([query], digit_table) == [Constant(5)]
    matrix = adder.answer_probs([query], list(range(19)), digit_table)
    assert matrix.probs.shape == (1, 19)
    assert matrix.probs[0, 4:7].tolist() == pytest.approx([0.2, 0.5, 0.3])
    assert float(matrix.probs.sum().detach()) == pytest.approx(1.0)

    no_answer = Query(Term("big", img(0), Constant(0)))  # digits 0..2 are never > 5
    assert two_nets.best_answers([no_answer], small_tables()) == [None]
    empty = two_nets.answer_probs([no_answer], [0, 1, 2], small_tables())
    assert empty.provable.tolist() == [False] and empty.probs.tolist() == [[0.0, 0.0, 0.0]]


def test_answer_outside_the_domain_is_an_error(two_nets):
    query = Query(Term("double", img(0), Constant(0)))  # answers 0, 2, 4
    with pytest.raises(DataError, match="has answer 4, which is not in the answer domain"):
        two_nets.answer_probs([query], [0, 2], small_tables())


# --------------------------------------------------------------------------- semiring


def test_exact_zero_semiring_shortcuts_plain_floats_only():
    semiring = ExactZeroSemiring(None, None, None)
    x = torch.tensor(0.3, requires_grad=True)
    assert semiring.times(x, 0.0) == 0.0 and type(semiring.times(x, 0.0)) is float
    assert type(semiring.times(0.0, x)) is float
    assert semiring.times(x, 1.0) is x and semiring.times(1.0, x) is x
    assert semiring.plus(x, 0.0) is x and semiring.plus(0.0, x) is x
    zero = torch.tensor(0.0, requires_grad=True)  # a tensor zero keeps its gradient
    assert semiring.times(zero, 0.5).grad_fn is not None
    assert semiring.plus(zero, 0.5).grad_fn is not None


# DeepProbLog's stock semiring calls float() on a tensor that requires grad; ours does not
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_graph_is_much_smaller_than_stock(
    adder, digit_table, digit_probs, stock_model_factory, count_autograd_nodes
):
    term = Term("addition", img(4), img(5), Constant(9))
    stock_probs = digit_probs.detach().clone().requires_grad_()  # (8, 10)
    stock = stock_model_factory(PROGRAMS / "addition.pl", stock_probs)
    stock_p = stock.solve([Query(term)])[0].result[term]
    ours = adder.query_probs([Query(term)], digit_table).probs
    assert float(ours[0]) == pytest.approx(float(stock_p), abs=1e-12)
    assert 3 * count_autograd_nodes(ours) < count_autograd_nodes(stock_p)
