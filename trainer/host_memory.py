"""Host memory that stays mapped once freed, so large CPU tensors are not refaulted page by page.

glibc's malloc serves every block over its mmap threshold (at most 32 MiB by default) with a fresh
mmap and unmaps it on free, so each new large tensor touches new pages: the kernel zero-fills them one
fault at a time. A matrix optimizer step on CPU allocates and frees hundreds of MiB of temporaries
(Newton–Schulz stacks, communication buffers), and on the 2-core machines this project is tested on
those faults took a quarter of the step (benchmarks/matrix_step.md). Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse, as PyTorch's CUDA caching allocator does for
device memory; the process's resident size then stays at its peak instead of shrinking.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BELOW = 1 << 30  # blocks under 1 GiB come from the heap and go back to it


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks under 1 GiB for reuse; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators decide
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
