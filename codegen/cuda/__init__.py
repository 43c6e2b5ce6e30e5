"""CUDA: integer-only kernels for NVIDIA GPUs (codegen/cuda/build.py), built without a GPU; the
artifacts run on the Relax VM with the fatbin nvcc made here (codegen/cuda/loader.py)."""
