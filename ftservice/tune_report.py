"""The Train-to-Tune report callback of a sweep trial, with the sweep's metric first.

Tune's live table shows its default columns and the first four other metrics of a trial's
latest result, in the result's own order; the workers' results start with the training
loss, gradient norm and learning rate, so the metric a sweep is ranked by would not be in
the table. Putting it (and the step) first makes the table show state, params and the
latest value of that metric.
"""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback


class MetricFirstReportCallback(TuneReportCallback):
    def __init__(self, first: list[str]):
        super().__init__()
        self._first = list(first)

    def after_report(self, run_context, metrics, checkpoint):
        ordered = [{k: m[k] for k in self._first if k in m} | m for m in metrics]
        super().after_report(run_context, ordered, checkpoint)
