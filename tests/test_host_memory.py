"""`rayalign.devices.release_freed_host_memory`: freed heap memory really leaves the process's resident set.

Thousands of small tensors (64 KiB each: below glibc's mmap threshold, so they live on the heap) are freed
except the last one, which pins the top of the heap so glibc cannot shrink it on its own; the release call
must then return most of the freed quarter gigabyte. Skipped where the C library is not glibc.
"""

import ctypes.util
import os
import platform

import pytest
import torch

from rayalign.devices import release_freed_host_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(platform.system() != "Linux" or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc_trim only")
def test_freed_heap_memory_returns_to_the_os():
    tensors = [torch.ones(16 * 1024) for _ in range(4096)]  # 4096 x 64 KiB = 256 MiB on the heap
    pin = torch.ones(16 * 1024)
    del tensors
    before = _rss_mb()
    release_freed_host_memory()
    after = _rss_mb()
    assert before - after > 128, (before, after)
    assert pin.sum() == 16 * 1024
