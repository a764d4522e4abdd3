"""Triton kernels of fastgen's ops (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
