"""pcsweep: backpropagation vs predictive coding, at sweep scale, from one command."""

__version__ = "0.1.0"
