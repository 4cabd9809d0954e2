"""glibc keeps the blocks a training step frees, so the next step does not fault their pages in again."""

import subprocess
import sys

import pytest

# A step holds sixteen 4 MiB blocks (activations) and frees them; the count is the page faults
# of five steps after two warm-up steps. It runs in a fresh interpreter's main thread and calls
# malloc itself: a test worker's long-lived, fragmented heap (or a thread's arena) and torch's
# own small allocations between the blocks would make the count depend on what ran before.
PAGE_FAULTS_OF_FIVE_STEPS = """
import ctypes, resource, sys
from saferlhf.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    blocks = [libc.malloc(4 * 2**20) for _ in range(16)]
    for block in blocks:
        ctypes.memset(block, 1, 4 * 2**20)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(2):
    step()
before = faults()
for _ in range(5):
    step()
print(faults() - before)
"""


def page_faults_of_five_steps(setting: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", PAGE_FAULTS_OF_FIVE_STEPS, setting],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_step_is_reused_without_page_faults():
    # glibc's default gives the 64 MiB freed at the heap's top back to the kernel each step, so
    # every step faults its 16,384 pages in again (81,760 in five steps here).
    assert page_faults_of_five_steps("default") > 50_000
    assert page_faults_of_five_steps("keep") < 1_000
