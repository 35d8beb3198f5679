% Task: MNIST less-than, single digits.
% Network: digit_net, K = 10 outputs; column j of p(y|x) is digit j (domain [0..9]).
% Query: less(X, Y) with X, Y digit images (tensor terms); it holds when the digit of X is
% smaller than the digit of Y.

nn(digit_net, [X], Y, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) :: digit(X, Y).

less(X, Y) :- digit(X, N1), digit(Y, N2), N1 < N2.
