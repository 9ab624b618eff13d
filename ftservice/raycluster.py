"""Connect to Ray: the embedded local one by default, or a running cluster by address."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """ray.init once per process.

    No address: join the cluster named by RAY_ADDRESS (set inside `ftservice submit` jobs),
    else start the embedded local Ray on this machine's CPUs. An address is what ray.init
    takes: `host:6379`, `auto`, or `ray://host:10001`.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # the embedded local Ray: progress shows in the terminal, no dashboard processes
        ray.init(include_dashboard=False, logging_level="warning")
    else:
        ray.init(address=address, logging_level="warning")
