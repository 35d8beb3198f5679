% Task: MNIST-Half (tasks/mnist_half.py): digits 0-4 only, single-digit sums.
% Network: digit_net, K = 5 outputs; column j of p(y|x) is digit j (domain [0..4]).
% Query: addition(X, Y, Z) with X, Y digit images (tensor terms) and Z their integer sum (0..8);
% leave Z unbound to get the distribution over sums.

nn(digit_net, [X], Y, [0, 1, 2, 3, 4]) :: digit(X, Y).

addition(X, Y, Z) :- digit(X, N1), digit(Y, N2), Z is N1 + N2.
