"""loopmark: benchmark and check the idioms of PyTorch training loops."""

__version__ = "0.1.0"
