"""keep_freed_host_memory: freed blocks are reused, so repeated big allocations stop page-faulting.

Each case runs in a fresh interpreter (the setting is process-wide) and counts minor page faults
(``getrusage``) while a 64 MiB tensor is allocated, written and freed eight more times, after a
warm-up (a training loop's steady state).
"""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
import moelab.train.loop                # where training calls it: after the imports have shaped the heap (a
if sys.argv[1] == "keep":               # bare interpreter's small heap may still fault once per block)
    from moelab.train.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory() and keep_freed_host_memory()   # idempotent
for _ in range(6):                      # 64 MiB blocks: first touches fault either way, and glibc
    torch.empty(16 << 20).fill_(1.0)    # may grow the heap a few times before freed blocks fit
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # glibc's defaults
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    """Transparent huge pages for every mapping: fresh 64 MiB blocks then fault in 2 MiB pages."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


def test_kept_memory_is_reused_without_page_faults():
    released, kept = _faults("release"), _faults("keep")
    pages = 8 * (64 << 20) // 4096
    if not _thp_always():
        assert released > pages * 3 // 4, f"expected glibc to unmap freed 64 MiB blocks by default ({released} faults)"
    assert kept <= pages // 8, f"{kept} page faults with freed memory kept (of {pages} pages written)"

