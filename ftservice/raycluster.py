"""Connect to Ray: the embedded local one by default, or a running cluster by address."""

from __future__ import annotations


def init_ray(address: str | None = None) -> None:
    """ray.init once per process.

    No address: join the cluster named by RAY_ADDRESS (set inside `ftservice submit` jobs),
    else start the embedded local Ray on this machine's CPUs. An address is what ray.init
    takes: `host:6379`, `auto`, or `ray://host:10001`. The local Ray keeps its dashboard:
    Ray Train's placement-group cleaner asks the state API, which lives there.
    """
    import os

    import ray

    if not ray.is_initialized():
        if address is None and "RAY_ADDRESS" not in os.environ:
            # The embedded Ray runs its workers at normal priority: on a machine that only
            # trains they are the work. (Ray's default, nice 15, cost ~8% of training
            # throughput on 2 CPUs here, behind Ray's own busier-than-idle processes.)
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, logging_level="warning")


def own_task(fn, num_cpus: float, num_gpus: float):
    """`fn` as a Ray task that asks the cluster for its own CPUs and GPUs and exits after one
    call (its memory goes back at once), also when called from inside a sweep trial, whose
    placement group holds no CPUs: tasks would join it by default and never fit."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_calls=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )(fn)
