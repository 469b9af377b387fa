"""Fresh host memory for `.cpu()` results that is cheap to fill.

Note [Huge pages]: a download must return fresh memory (the caller owns the result), and a
large `torch.empty` is a fresh anonymous mapping whose pages the kernel faults in one at a
time while `recv_into` fills it: with 4 KiB pages that is 16,384 faults per 64 MiB, about as
much time as the transfer itself on loopback. Asking for transparent huge pages on the
buffer (`madvise(MADV_HUGEPAGE)`, which hosts whose THP mode is "madvise" require) makes it
32 faults. Only the 2 MiB-aligned interior of a buffer is advised, so nothing outside the
tensor's own memory changes; the advice is a hint, and where it fails or does not exist the
buffer is used as it is.
"""

from __future__ import annotations

import ctypes
import sys

import torch

#: Buffers smaller than this are not advised (a few faults; the call would cost more).
HUGE_MIN_BYTES = 8 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _load_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty_for_download(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor, advised to use huge pages when large (see Note [Huge pages])."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _madvise is not None and nbytes >= HUGE_MIN_BYTES:
        p = out.data_ptr()
        start = (p + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (p + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return out
