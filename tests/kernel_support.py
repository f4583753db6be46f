"""What every kernel test file shares: where the kernels run and the markers that gate them."""
import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# conftest.py turns Triton's interpreter on for CPU runs before triton is imported; if something
# imported triton earlier, the kernels cannot run here: skip and say why rather than fail obscurely.
runs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and isinstance(tl.max, JITFunction),
    reason="triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)",
)
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
