"""GPU dispatch table of the low-bit frozen-linear forward (see dispatch.py). Written by bench/native_gpu.py."""

# Default, not measured: no GPU run has been committed yet. Run `python bench/native_gpu.py --write-table` on a GPU.
MEASURED = False
SOURCE = "default (not measured): the Triton kernels in every bucket"
TABLE: dict[str, dict[int, str]] = {
    "int8": {1: "triton", 2: "triton", 4: "triton", 8: "triton", 16: "triton"},
    "int4": {1: "triton", 2: "triton", 4: "triton", 8: "triton", 16: "triton"},
}
