"""Asynchronous successive halving with promotions (ASHA, Li et al., MLSys 2020) for Tune.

Ray's `ASHAScheduler` is the stopping variant: a trial reaching a rung goes on unless it is
below the top 1/η of the trials recorded there so far. The first trials through a rung have
nothing to be compared with, so they always go on, and on a small grid that costs most of
the savings (measured in benchmarks/README.md). The paper's ASHA promotes instead: a trial
trains to a rung (grace_period · η^k reports) and waits there, its Ray Train checkpoint kept,
and a new trial starts only when no waiting trial can be promoted. The paper promotes a
trial ranked in the top 1/η of the trials recorded at its rung so far; on a sweep of a known
size (every Tune sweep has one) that still promotes trials that later ones beat. Here a
trial is promoted once it is sure to rank in the top 1/η (at least one) of all the trials
that reach its rung, even if every trial that may still arrive there beats it. A sweep so
spends exactly what synchronous successive halving would, without waiting at rungs while
new trials can run; when nothing can arrive at a rung any more and nothing can be promoted,
the waiting trials stop and the sweep ends.

Tune pauses a waiting trial (its actor ends; `pause_trial` without a Tune checkpoint) and
starts it again on promotion; the trial's function trains the same Ray Train run, which
resumes from the checkpoint written at the rung. New trials are gated at the searcher
(`gate`), because Tune starts every pending trial it has resources for, and a trial that
only drives a Train run asks for almost none. The scheduler's state is kept in a JSON file
beside the sweep: `--resume` keeps waiting trials waiting, and a trial's function reads
which rungs it was promoted from.
"""

from __future__ import annotations

import math
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from ftservice.records import Record

RUNG = "rung_step"  # the result key of a trial's report at a rung (the trial function's)


class AshaState(Record):
    """`asha.json` beside a sweep: what the scheduler decided, for --resume and the report."""

    format_version: int = 1
    rungs: list[int]
    recorded: list[dict[str, float]]
    """Per rung: trial id -> the metric it reported there."""
    promoted: list[list[str]]
    """Per rung: the trial ids promoted from it."""
    waiting: dict[str, int]
    """Trial id -> index of the rung it waits at."""


def rung_steps(grace_period: int, reduction_factor: float, every_steps: int, limit=10**7):
    """The training steps at which trials stop and wait: grace · η^k reports of every_steps."""
    steps, k = [], 0
    while True:
        step = round(grace_period * reduction_factor**k) * every_steps
        if step >= limit:
            return steps
        if not steps or step > steps[-1]:
            steps.append(step)
        k += 1


def promoted_from(state_file: str | Path, trial_id: str) -> set[int]:
    """The rung steps the trial was promoted from (read by the trial's own function, which
    then waits at every other rung it reaches, even one it restarts at after a crash)."""
    path = Path(state_file)
    if not path.is_file():
        return set()
    state = AshaState.read(path)
    return {step for step, ids in zip(state.rungs, state.promoted, strict=True)
            if trial_id in ids}  # fmt: skip


class PromotingASHA(FIFOScheduler):
    def __init__(
        self,
        rungs: list[int],
        reduction_factor: float,
        max_running: int,
        state_file: str | None,
    ):
        super().__init__()  # metric and mode come from the TuneConfig
        self.rungs = list(rungs)
        self.eta = reduction_factor
        self.max_running = max_running
        self.state_file = state_file  # None: nothing kept (a replay)
        self.recorded: list[dict[str, float]] = [{} for _ in self.rungs]  # metric at rung k
        self.promoted: list[set[str]] = [set() for _ in self.rungs]
        self.waiting: dict[str, int] = {}  # trial id -> rung index it waits at
        self._loaded = False
        self._controller = None

    def __getstate__(self):
        return self.__dict__ | {"_controller": None}

    # --- state kept beside the sweep, for --resume
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.state_file is None or not Path(self.state_file).is_file():
            return
        state = AshaState.read(self.state_file)
        if state.rungs != self.rungs:
            return
        self.recorded = [dict(r) for r in state.recorded]
        self.promoted = [set(p) for p in state.promoted]
        self.waiting = dict(state.waiting)

    def _save(self) -> None:
        if self.state_file is None:
            return
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        AshaState(
            rungs=self.rungs,
            recorded=self.recorded,
            promoted=[sorted(p) for p in self.promoted],
            waiting=self.waiting,
        ).write(path)

    # --- what Tune calls
    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._load()
        self._controller = tune_controller

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._load()
        step = result.get(RUNG)
        if step not in self.rungs:
            return TrialScheduler.CONTINUE
        k = self.rungs.index(step)
        value = result.get(self._metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            value = math.inf if self._mode == "min" else -math.inf  # ranks last
        self.recorded[k][trial.trial_id] = value
        self.waiting[trial.trial_id] = k
        pick = self._promotable(tune_controller.get_trials(), exclude=trial)
        if pick is trial:  # promoted at once: its function trains on to the next rung
            self._promote(trial)
            self._save()
            return TrialScheduler.CONTINUE
        self._save()
        tune_controller.pause_trial(trial, should_checkpoint=False)
        return TrialScheduler.NOOP

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._forget(trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    def _forget(self, trial: Trial) -> None:
        self._load()
        if self.waiting.pop(trial.trial_id, None) is not None:
            self._save()

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        self._load()
        self._controller = tune_controller
        trials = tune_controller.get_trials()
        for t in trials:  # restored by --resume as pending: they wait at their rung again
            if t.status == Trial.PENDING and t.trial_id in self.waiting:
                tune_controller._set_trial_status(t, Trial.PAUSED)
        running = _running(trials)
        if len(running) >= self.max_running:
            return None
        pick = self._promotable(trials)
        if pick is not None:
            self._promote(pick)
            self._save()
            return pick
        if not running and tune_controller.search_alg.is_finished():
            # no trial can arrive at any rung any more, and none can go on: the sweep ends
            for t in trials:
                if t.trial_id in self.waiting and t.status == Trial.PAUSED:
                    tune_controller.stop_trial(t)
        return None

    def gate(self) -> bool:
        """May the searcher add a new trial now? Only into a free slot that no waiting
        trial can be promoted into."""
        if self._controller is None:
            return True
        self._load()
        trials = self._controller.get_trials()
        return len(_running(trials)) < self.max_running and self._promotable(trials) is None

    # --- the algorithm
    def _promotable(self, trials: list[Trial], exclude: Trial | None = None) -> Trial | None:
        """The waiting trial to promote next, from the highest rung down, or None.

        A trial is promoted once it is sure to rank in the top 1/η (at least one) of every
        trial of the sweep that reaches its rung: even if all the trials that may still
        arrive there (not started yet, or running below it) beat it."""
        by_id = {t.trial_id: t for t in trials}
        heading = [self._heading(t.trial_id) for t in _running(trials) if t is not exclude]
        total = getattr(self._controller.search_alg, "total_samples", 0) or len(trials)
        sign = 1 if self._mode == "min" else -1
        for k in reversed(range(len(self.rungs))):
            values = self.recorded[k]
            unknown = max(0, total - len(trials)) + sum(h <= k for h in heading)
            quota = max(1, int(len(values) // self.eta))
            for rank, tid in enumerate(sorted(values, key=lambda t: sign * values[t])):
                if rank + unknown >= quota:
                    break
                if tid in self.promoted[k] or self.waiting.get(tid) != k:
                    continue
                if tid in by_id and math.isfinite(values[tid]):
                    return by_id[tid]
        return None

    def _heading(self, trial_id: str) -> int:
        """The rung a running trial trains towards: the one after its last promotion."""
        return max((k + 1 for k, ids in enumerate(self.promoted) if trial_id in ids), default=0)

    def _promote(self, trial: Trial) -> None:
        self.promoted[self.waiting.pop(trial.trial_id)].add(trial.trial_id)

    def debug_string(self) -> str:
        at = list(self.waiting.values())
        waiting = ", ".join(f"{at.count(k)} at step {s}" for k, s in enumerate(self.rungs)
                            if k in at)  # fmt: skip
        return f"Using ASHA with promotions: rungs at steps {self.rungs}; waiting: {waiting or 0}"


def _running(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.status in (Trial.RUNNING, Trial.PENDING)]


class GatedVariants(BasicVariantGenerator):
    """Tune's grid/random generator, adding a trial only when the scheduler's gate opens."""

    def __init__(self, gate, **kwargs):
        super().__init__(**kwargs)
        self._gate = gate

    def next_trial(self):
        if not self._gate():
            return None
        return super().next_trial()

    def get_state(self):
        state = super().get_state()
        if state:
            state.pop("_gate", None)
        return state


class GatedLimiter(ConcurrencyLimiter):
    """A model-based searcher, suggesting only when the scheduler's gate opens."""

    def __init__(self, searcher, gate, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self._gate = gate

    def suggest(self, trial_id: str):
        if not self._gate():
            return None
        return super().suggest(trial_id)

    def get_state(self):
        gate, self._gate = self._gate, None
        try:
            state = super().get_state()
        finally:
            self._gate = gate
        state.pop("_gate", None)
        return state
