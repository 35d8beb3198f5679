% Task: MNIST product, single digits.
% Network: digit_net, K = 10 outputs; column j of p(y|x) is digit j (domain [0..9]).
% Query: product(X, Y, Z) with X, Y digit images (tensor terms) and Z their integer product
% (0..81); leave Z unbound to get the distribution over products.

nn(digit_net, [X], Y, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) :: digit(X, Y).

product(X, Y, Z) :- digit(X, N1), digit(Y, N2), Z is N1 * N2.
