"""Runtimes outside JAX: the PyTorch bridge (cpu / cuda / npu) and the Ascend deployment path."""
