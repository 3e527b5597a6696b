"""The `checkout-reconciler` schedule: a ReconcilerWorkflow every RECONCILE_INTERVAL seconds.

Every worker ensures it at start-up: created if missing, brought in line with the settings if
its interval or task queue differ. Its state (paused by an operator, a note) is kept. Workers
that start together race harmlessly: one creates it, the others find it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from core.settings import Settings
from core.workflow_ids import RECONCILER_SCHEDULE_ID, reconciler_workflow_id
from workflows.reconciler import ReconcilerWorkflow
from workflows.reconciler_models import ReconcilerInput

log = logging.getLogger(__name__)


def reconciler_schedule(settings: Settings) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ReconcilerWorkflow.run,
            ReconcilerInput(),
            # The schedule appends each run's scheduled time to this id.
            id=reconciler_workflow_id(),
            task_queue=settings.temporal_task_queue,
            static_summary="Settle checkouts whose workflow was terminated, reset or lost",
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.reconcile_interval))]
        ),
        # One run at a time: a start due while a run is still going is dropped.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_reconciler_schedule(client: Client, settings: Settings) -> None:
    """Create the schedule, or update it if it differs from the settings."""
    wanted = reconciler_schedule(settings)
    try:
        await client.create_schedule(RECONCILER_SCHEDULE_ID, wanted)
    except ScheduleAlreadyRunningError:
        pass
    else:
        log.info(
            "created schedule %r: every %d s", RECONCILER_SCHEDULE_ID, settings.reconcile_interval
        )
        return

    def update(current: ScheduleUpdateInput) -> ScheduleUpdate | None:
        schedule = current.description.schedule
        if _same(schedule, wanted):
            return None  # no update call at all
        log.info(
            "updating schedule %r: every %d s on task queue %r",
            RECONCILER_SCHEDULE_ID,
            settings.reconcile_interval,
            settings.temporal_task_queue,
        )
        return ScheduleUpdate(
            schedule=Schedule(
                action=wanted.action, spec=wanted.spec, policy=wanted.policy, state=schedule.state
            )
        )

    await client.get_schedule_handle(RECONCILER_SCHEDULE_ID).update(update)


def _same(current: Schedule, wanted: Schedule) -> bool:
    action, target = current.action, wanted.action
    return (
        isinstance(action, ScheduleActionStartWorkflow)
        and isinstance(target, ScheduleActionStartWorkflow)
        and action.workflow == target.workflow
        and action.task_queue == target.task_queue
        and [i.every for i in current.spec.intervals] == [i.every for i in wanted.spec.intervals]
        and not current.spec.calendars
        and not current.spec.cron_expressions
        and current.policy.overlap == wanted.policy.overlap
    )
