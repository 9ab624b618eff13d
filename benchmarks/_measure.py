"""Run a command and sample the summed PSS of its whole process tree: wall time and peak memory.

PSS (proportional set size) splits shared pages between the processes that map them, so
Ray's shared-memory object store is counted once, not once per worker.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psutil


def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall seconds, peak tree PSS (MiB) and output of `cmd`; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, _tree_pss(ps))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mib": round(peak / 2**20, 1), "stdout": out}
