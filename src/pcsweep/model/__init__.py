"""The twins as Lightning modules (``twins``: BP by autograd, PC driving ``pcsweep.pc``) over the one MLP they share
(``mlp``)."""
