"""An operator's refund of a paid order: one durable `refund-{order_id}` workflow."""

from __future__ import annotations

import uuid

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from activities.refunds import RefundOrderInput
from api.services.checkout import temporal_unavailable
from core import logs
from core.errors import InvalidState
from core.orders import OrderStore
from core.settings import Settings
from core.vocabulary import OrderStatus
from core.workflow_ids import refund_workflow_id
from workflows.refund import RefundWorkflow


class RefundService:
    def __init__(self, client: Client, settings: Settings, orders: OrderStore) -> None:
        self._client = client
        self._task_queue = settings.temporal_task_queue
        self._orders = orders

    async def refund(self, order_id: uuid.UUID) -> str:
        """Refund a paid order in full; answers once Stripe refunded and the stock is back."""
        logs.bind(order_id=order_id, workflow_id=refund_workflow_id(order_id))
        status = await self._orders.status(order_id)
        if status == OrderStatus.REFUNDED:
            return OrderStatus.REFUNDED
        if status != OrderStatus.PAID:
            raise InvalidState(f"the order is {status}, not paid", details={"status": status})
        try:
            result = await self._client.execute_workflow(
                RefundWorkflow.run,
                RefundOrderInput(order_id=order_id, reason="requested_by_operator"),
                id=refund_workflow_id(order_id),
                task_queue=self._task_queue,
                # Concurrent requests wait for the same refund.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Refund of order {order_id}",
            )
        except WorkflowAlreadyStartedError:
            result = None
        except RPCError as exc:
            raise temporal_unavailable(exc) from exc
        final = result.status if result else await self._orders.status(order_id)
        if final != OrderStatus.REFUNDED:
            raise InvalidState(f"the order is {final}, not paid", details={"status": final})
        return OrderStatus.REFUNDED
