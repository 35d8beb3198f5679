% Task: MNIST N-digit addition (tasks/mnist_addition.py with n_digits: N > 1; works for N = 1).
% Network: digit_net, K = 10 outputs; column j of p(y|x) is digit j (domain [0..9]).
% Query: add([A1, ..., AN], [B1, ..., BN], S): two N-digit numbers as lists of digit images
% (tensor terms), most significant digit first, and S their integer sum (0 .. 2 * 10^N - 2).
%
% S given (training): column addition with a carry, least significant column first. Each column
% grounds 2 carries in x 2 carries out x the digit pairs that write S's digit, so the ground
% program is linear in N; it never enumerates the 10^(2N) digit combinations or the sums.
% S unbound (test-time distribution over sums): the sum is built column by column; that
% grounding has one branch per partial sum, so it grows as 10^N: use it for N <= 2 or 3.
% For larger N, logic.engine: column_chain (gedi_nesy/logic/chain.py) evaluates add/3 from column/5
% alone, as the exact chain of the carries, after checking it against these clauses.
%
% add/3 is also one of DeepProbLog's tensor builtins, which Model.set_engine registers;
% gedi_nesy.logic.dpl.LogicModel does not register them, so only the clauses below define add/3.

nn(digit_net, [X], Y, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) :: digit(X, Y).

add(As, Bs, S) :-
    nonvar(S), reverse(As, RAs), reverse(Bs, RBs), check_columns(RAs, RBs, 0, S).
add(As, Bs, S) :-
    var(S), reverse(As, RAs), reverse(Bs, RBs), sum_columns(RAs, RBs, 0, 1, 0, S).

% column(A, B, Cin, D, Cout): digit images A and B plus carry Cin write digit D, carry Cout.
column(A, B, Cin, D, Cout) :- digit(A, DA), digit(B, DB), DA + DB + Cin =:= D + 10 * Cout.

% check_columns(As, Bs, Cin, S): the columns As + Bs (least significant first) plus carry Cin
% make the number S.
check_columns([], [], Carry, Carry).
check_columns([A | As], [B | Bs], Cin, S) :-
    D is S mod 10, Rest is S // 10, between(0, 1, Cout),
    column(A, B, Cin, D, Cout),
    check_columns(As, Bs, Cout, Rest).

% sum_columns(As, Bs, Cin, Weight, Acc, S): S = Acc + Weight * (As + Bs + Cin), the columns
% least significant first.
sum_columns([], [], Carry, Weight, Acc, S) :- S is Acc + Weight * Carry.
sum_columns([A | As], [B | Bs], Cin, Weight, Acc, S) :-
    between(0, 1, Cout), between(0, 9, D),
    column(A, B, Cin, D, Cout),
    Acc1 is Acc + Weight * D, Weight1 is 10 * Weight,
    sum_columns(As, Bs, Cout, Weight1, Acc1, S).
