"""The worker's own metrics, on the Temporal SDK's meter: they appear on the same Prometheus
endpoint as the SDK's metrics (`WORKER_METRICS_PORT`, served by the SDK's core), one endpoint per
process. Workflows count through `workflow.metric_meter()`, which records nothing on replay:

    checkout_completed_total{outcome}     paid, cancelled, expired, rejected (workflows/checkout.py)

Everything here runs in activities or beside them:

    checkout_activity_runs_total{activity_type, outcome, error}   outcome: completed, failed
        (will be retried), failed_final (non-retryable: a refusal), cancelled
    checkout_activity_duration_seconds{activity_type, outcome}    one attempt, histogram
    checkout_payment_to_paid_seconds                              webhook received -> order paid
    checkout_outbox_publish_lag_seconds                           outbox row committed -> broker
                                                                  confirmed (the relay reports)
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, Final

from temporalio import activity
from temporalio.common import MetricCounter, MetricHistogramTimedelta, MetricMeter
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from core import logs

# Histogram buckets (seconds) of the metrics below, handed to the SDK's Prometheus exporter.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACTIVITY_RUNS = "checkout_activity_runs"
ACTIVITY_DURATION = "checkout_activity_duration_seconds"
PAYMENT_TO_PAID = "checkout_payment_to_paid_seconds"
OUTBOX_PUBLISH_LAG = "checkout_outbox_publish_lag_seconds"
HISTOGRAMS: Final = (ACTIVITY_DURATION, PAYMENT_TO_PAID, OUTBOX_PUBLISH_LAG)


class WorkerMetrics:
    """Made once per worker from its runtime's meter (a no-op meter without metrics)."""

    def __init__(self, meter: MetricMeter) -> None:
        self._runs = meter.create_counter(
            ACTIVITY_RUNS, "Activity attempts of the worker, by activity and outcome"
        )
        self._duration = meter.create_histogram_timedelta(
            ACTIVITY_DURATION, "Duration of one activity attempt", unit="s"
        )
        self._payment_to_paid = meter.create_histogram_timedelta(
            PAYMENT_TO_PAID,
            "From the payment_intent.succeeded webhook's arrival to the order marked paid",
            unit="s",
        )
        self._publish_lag = meter.create_histogram_timedelta(
            OUTBOX_PUBLISH_LAG,
            "From an outbox row's commit to the broker's confirm of its message",
            unit="s",
        )
        # Metrics with their labels fixed, per label set: an SDK call saved per recording.
        self._runs_by: dict[tuple[str, str, str], MetricCounter] = {}
        self._duration_by: dict[tuple[str, str], MetricHistogramTimedelta] = {}

    def activity_attempt(
        self, activity_type: str, outcome: str, error: str, duration: timedelta
    ) -> None:
        runs = self._runs_by.get((activity_type, outcome, error))
        if runs is None:
            runs = self._runs_by[activity_type, outcome, error] = (
                self._runs.with_additional_attributes(
                    {"activity_type": activity_type, "outcome": outcome, "error": error}
                )
            )
        runs.add(1)
        took = self._duration_by.get((activity_type, outcome))
        if took is None:
            took = self._duration_by[activity_type, outcome] = (
                self._duration.with_additional_attributes(
                    {"activity_type": activity_type, "outcome": outcome}
                )
            )
        took.record(duration)

    def payment_to_paid(self, duration: timedelta) -> None:
        self._payment_to_paid.record(max(duration, timedelta(0)))

    def outbox_published(self, lag: timedelta) -> None:
        """For the outbox relay: call once per message the broker confirmed, with
        `confirmed_at - occurred_at`."""
        self._publish_lag.record(max(lag, timedelta(0)))


def _ids_of(arg: Any) -> dict[str, Any]:
    """The checkout and order an activity's input names (the reconciler's: its `checkout`)."""
    inner = getattr(arg, "checkout", None)
    source = inner if inner is not None and hasattr(inner, "checkout_id") else arg
    return {
        "checkout_id": getattr(source, "checkout_id", None),
        "order_id": getattr(source, "order_id", None),
    }


class ActivityTelemetry(Interceptor):
    """Every activity attempt: its outcome and duration counted, and its log lines carrying the
    workflow, checkout and order ids."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityTelemetryInbound(next, self._metrics)


class _ActivityTelemetryInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, metrics: WorkerMetrics) -> None:
        super().__init__(next)
        self._metrics = metrics

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        logs.bind(workflow_id=info.workflow_id, **_ids_of(input.args[0] if input.args else None))
        started = time.monotonic()
        outcome, error = "completed", ""
        try:
            return await self.next.execute_activity(input)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except ApplicationError as exc:
            outcome = "failed_final" if exc.non_retryable else "failed"
            error = exc.type or type(exc).__name__
            raise
        except BaseException as exc:
            outcome, error = "failed", type(exc).__name__
            raise
        finally:
            self._metrics.activity_attempt(
                info.activity_type, outcome, error, timedelta(seconds=time.monotonic() - started)
            )
