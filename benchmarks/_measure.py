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


def _pss(pid: int) -> int:
    """PSS in bytes from /proc/PID/smaps_rollup (the kernel's sum; cheap to read)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            total += _pss(p.pid)
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
            time.sleep(1.0)  # sampling itself costs CPU: keep it rare

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mib": round(peak / 2**20, 1), "stdout": out}


def json_output(stdout: str) -> dict:
    """The JSON object a `--json` command printed (libraries may print lines before it)."""
    import json

    return json.loads(stdout[stdout.index("{\n") :])
