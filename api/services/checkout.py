"""Starting a checkout (Update-with-Start of its workflow), reading its live state, cancelling it.

Who may do what is decided here from the caller's credential (see `api.auth`): a checkout
belongs to its customer's `sub`, a guest's to nobody but its order token, and admin reaches all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from datetime import timedelta
from typing import Any

import stripe
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.reconcile import SettleStaleCheckoutInput, StaleCheckout
from api.access import OrderAccess
from api.auth import Caller, CallerKind
from api.client_address import rate_limit_identity
from api.metrics import ApiMetrics
from api.ratelimit import CheckoutLimiter
from api.schemas import CheckoutIn
from api.services.lines import requested_lines
from core import logs
from core.carts import CartCaller, CartNotOpen, CartStore
from core.checkout_keys import CheckoutKeyStore, KeyClaim, RecordedCheckout
from core.customers import customer_scope
from core.errors import ErrorCode, Forbidden, InvalidState, NotFound, ServiceError, Unavailable
from core.orders import OrderStore, OrderView
from core.sealing import Sealer
from core.settings import Settings
from core.stripe_gateway import StripeGateway
from core.temporal import retry_while_busy
from core.vocabulary import CheckoutStatus, OrderStatus
from core.workflow_ids import (
    checkout_workflow_id,
    lost_checkout_cancel_workflow_id,
    start_update_id,
)
from workflows.checkout import CheckoutWorkflow, start_search_attributes
from workflows.models import (
    Address,
    CartItem,
    CheckoutCreated,
    CheckoutFailure,
    CheckoutInput,
    CheckoutState,
    Customer,
    LineOut,
    PaymentOut,
    StartResult,
    Totals,
)
from workflows.reconciler import SettleLostCheckoutWorkflow

log = logging.getLogger(__name__)

# POST /checkout answers within this, whatever Temporal or Stripe do.
CHECKOUT_ANSWER_TIMEOUT = 30.0

# How many times one request follows its key to a new attempt after the attempt it joined
# failed `unavailable` (that attempt released the key when it gave up).
MAX_ATTEMPTS_PER_REQUEST = 3


def fingerprint(body: CheckoutIn, owner: str | None) -> str:
    """sha256 of the request as resolved (the owner it checks out for), canonical JSON."""
    request = body.model_dump(mode="json")
    request["customer"]["user_id"] = owner
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def temporal_unavailable(exc: BaseException) -> Unavailable:
    log.warning("temporal unavailable (%s): %s", type(exc).__name__, exc)
    return Unavailable("the checkout service cannot reach Temporal; try again")


def _refusal(result: StartResult) -> ServiceError:
    assert result.failure is not None
    failure = result.failure
    return ServiceError(failure.message, details=failure.details, code=failure.code)


def _update_error(exc: WorkflowUpdateFailedError) -> ServiceError:
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.type:
        details = cause.details[0] if cause.details else None
        return ServiceError(cause.message, details=details, code=cause.type)
    return temporal_unavailable(exc)


def _bind(checkout_id: uuid.UUID, order_id: uuid.UUID) -> None:
    """Every log line of this request from now on names the checkout, its order and its run."""
    logs.bind(
        checkout_id=checkout_id, order_id=order_id, workflow_id=checkout_workflow_id(checkout_id)
    )


def owner_of(body: CheckoutIn, caller: Caller) -> str | None:
    """The user id the checkout belongs to, by the contract's rules, or Forbidden."""
    named = body.customer.user_id
    if caller.kind == CallerKind.ADMIN:
        return named
    if caller.kind == CallerKind.CUSTOMER:
        if named is not None and named != caller.user_id:
            raise Forbidden("a customer checks out as itself: user_id must be your own or absent")
        return caller.user_id
    if caller.kind == CallerKind.GUEST:
        if named is not None:
            raise Forbidden("a guest checkout cannot name a user_id; sign in instead")
        return None
    raise Forbidden("an order token cannot start a checkout")


class CheckoutService:
    def __init__(
        self,
        client: Client,
        settings: Settings,
        orders: OrderStore,
        keys: CheckoutKeyStore,
        access: OrderAccess,
        limiter: CheckoutLimiter,
        stripe: StripeGateway,
        sealer: Sealer,
        metrics: ApiMetrics | None = None,
        carts: CartStore | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics or ApiMetrics()
        self._task_queue = settings.temporal_task_queue
        self._orders = orders
        self._keys = keys
        self._access = access
        self.limiter = limiter
        self._stripe = stripe
        self._sealer = sealer
        self._carts = carts
        # Read at each checkout's start and fixed in its input from then on; tests and load
        # runs may change them on a running service.
        self.payment_timeout_seconds = settings.checkout_payment_timeout
        self.max_pending_checkouts = settings.max_pending_checkouts
        self.key_ttl_seconds = settings.idempotency_ttl_seconds

    async def start(
        self,
        body: CheckoutIn,
        idempotency_key: str | None,
        caller: Caller,
        address: str,
        cart_caller: CartCaller | None = None,
    ) -> tuple[CheckoutCreated, bool]:
        """Start (or rejoin) the checkout; returns it and whether this request created it.

        A request that would start a new checkout counts against the rate limits of its client
        address and its customer; a duplicate of a live key does not (it reserves nothing, and
        a client may retry any number of times). Admin, a trusted backend, is not limited.
        """
        user_id = owner_of(body, caller)
        scope = customer_scope(user_id, body.customer.email)
        customer = Customer(email=body.customer.email, user_id=user_id)
        # Of the request as resolved: a customer's body with or without its own user_id is the
        # same request.
        request_fingerprint = fingerprint(body, user_id)
        try:
            items = await requested_lines(body, self._carts, cart_caller)
        except CartNotOpen:
            # The cart was checked out by this very request's checkout (now paid): a replay of
            # its key answers that checkout, as any replay does.
            found = await self._keys.find(scope, idempotency_key) if idempotency_key else None
            if found is None or found[1] is None or found[0].fingerprint != request_fingerprint:
                raise
            return await self._replay(found[1]), False

        async def rate_limit() -> None:
            if caller.kind != CallerKind.ADMIN:
                await self.limiter.hit(rate_limit_identity(address), f"customer:{scope}")

        if not idempotency_key:
            await rate_limit()
            claim = KeyClaim(uuid.uuid4(), uuid.uuid4(), request_fingerprint, claimed=True)
            result = await self._start_attempt(body, items, customer, claim)
            return await self._created(result), True

        counted = False

        async def count_once() -> None:
            # A request that follows its key to a new attempt is still one request.
            nonlocal counted
            if not counted:
                counted = True
                await rate_limit()

        for _ in range(MAX_ATTEMPTS_PER_REQUEST):
            claim, recorded = await self._keys.claim(
                scope,
                idempotency_key,
                request_fingerprint,
                ttl_seconds=self.key_ttl_seconds,
                before_claiming=count_once,
            )
            if claim.fingerprint != request_fingerprint:
                raise ServiceError(
                    "this Idempotency-Key was used with a different request body",
                    code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
                )
            if recorded is not None:
                # Answered from the record: no second run, no update in the checkout's history.
                return await self._replay(recorded), False
            result = await self._start_attempt(body, items, customer, claim)
            joined_a_failed_attempt = (
                not claim.claimed
                and result.failure is not None
                and result.failure.code == ErrorCode.UNAVAILABLE
            )
            if not joined_a_failed_attempt:
                break
        return await self._created(result), claim.claimed

    async def _created(self, result: StartResult) -> CheckoutCreated:
        """The workflow's answer, with the client_secret unsealed for the client (a run that
        began before sealing has it in clear)."""
        if result.failure is not None:
            raise _refusal(result)
        created = result.created
        assert created is not None
        payment = created.payment
        secret = payment.client_secret
        if secret is None:  # sealed; or, from a worker that returned neither, Stripe's
            secret = await self._client_secret(
                created.checkout_id, payment.client_secret_sealed, payment.payment_intent_id
            )
        return created.model_copy(
            update={
                "payment": payment.model_copy(
                    update={"client_secret": secret, "client_secret_sealed": None}
                )
            }
        )

    async def _client_secret(
        self, checkout_id: uuid.UUID, sealed: str | None, intent_id: str
    ) -> str | None:
        secret = self._sealer.unseal(sealed)
        if secret is not None:
            return secret
        # Sealed under another SECRET_KEY (or before sealing existed): Stripe has it.
        try:
            intent = await self._stripe.retrieve_intent(intent_id)
        except stripe.StripeError as exc:
            log.warning("checkout %s: the client_secret from Stripe: %s", checkout_id, exc)
            raise Unavailable(
                "Stripe cannot be reached to answer this checkout; try again"
            ) from exc
        return intent.client_secret

    async def _replay(self, recorded: RecordedCheckout) -> CheckoutCreated:
        _bind(recorded.checkout_id, recorded.order_id)
        secret = await self._client_secret(
            recorded.checkout_id, recorded.client_secret_sealed, recorded.payment_intent_id
        )
        return CheckoutCreated(
            checkout_id=recorded.checkout_id,
            order_id=recorded.order_id,
            status=recorded.order_status,
            currency=recorded.currency,
            items=[LineOut.model_validate(line, from_attributes=True) for line in recorded.lines],
            totals=Totals(
                subtotal=recorded.subtotal,
                discount=recorded.discount,
                tax=recorded.tax,
                shipping=recorded.shipping,
                total=recorded.total,
            ),
            payment=PaymentOut(
                payment_intent_id=recorded.payment_intent_id,
                client_secret=secret,
                status=recorded.payment_status,
            ),
            expires_at=recorded.expires_at,
        )

    async def _start_attempt(
        self, body: CheckoutIn, items: list[tuple[str, int]], customer: Customer, claim: KeyClaim
    ) -> StartResult:
        """Update-with-Start the claim's checkout (or, if it has ended, read its answer)."""
        _bind(claim.checkout_id, claim.order_id)
        input = CheckoutInput(
            checkout_id=claim.checkout_id,
            order_id=claim.order_id,
            customer=customer,
            items=[CartItem(sku=sku, quantity=quantity) for sku, quantity in items],
            metadata=body.metadata or {},
            payment_timeout_seconds=self.payment_timeout_seconds,
            request_fingerprint=claim.fingerprint,
            max_pending_checkouts=self.max_pending_checkouts,
            address=Address(**body.address.model_dump()) if body.address else None,
            shipping_method=body.shipping_method,
            promotion_code=body.promotion_code,
            cart_id=body.cart_id,
        )

        def operation() -> WithStartWorkflowOperation[Any, Any]:
            # A new one per call: an operation carries the outcome of the call it was sent with.
            return WithStartWorkflowOperation(
                CheckoutWorkflow.run,
                input,
                id=checkout_workflow_id(claim.checkout_id),
                task_queue=self._task_queue,
                # Concurrent duplicates join the running checkout; a finished one is never re-run.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=start_search_attributes(input),
                static_summary=f"Checkout of {len(items)} line(s) for {customer.email}",
            )

        try:
            async with asyncio.timeout(CHECKOUT_ANSWER_TIMEOUT):
                result: StartResult = await retry_while_busy(
                    lambda: self._client.execute_update_with_start_workflow(
                        CheckoutWorkflow.start,
                        input.request_fingerprint,
                        start_workflow_operation=operation(),
                        # One update per checkout: duplicates attach to it and get its answer.
                        id=start_update_id(claim.checkout_id),
                    )
                )
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            refused = isinstance(cause, ApplicationError) and bool(cause.type)
            # The update also fails when its run closes under it ("closed before
            # WorkflowTaskStarted": terminated while opening).
            if not refused and await self._closed(claim):
                return await self._finished_start(claim)
            raise _update_error(exc) from exc
        except WorkflowAlreadyStartedError:
            # The checkout already ran to its end: answer from its final state.
            return await self._finished_start(claim)
        except RPCError as exc:
            # Besides "already started", a run that closed under the update ("aborted by
            # closing workflow", "closed before WorkflowTaskStarted": terminated, say) answers
            # with an error of its own kind; its final state tells the rest.
            if exc.status == RPCStatusCode.ALREADY_EXISTS or await self._closed(claim):
                return await self._finished_start(claim)
            raise temporal_unavailable(exc) from exc
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as exc:
            # The checkout may still open later; the same key then answers with it, and if
            # nobody comes back for it, it expires and gives its stock back.
            raise temporal_unavailable(exc) from exc
        if claim.claimed:
            # This request owns the key (PostgreSQL decided among replicas): its run is new.
            self._metrics.checkouts_started.inc()
            log.info(
                "checkout %s: %s",
                "refused" if result.failure else "open for payment",
                result.failure.code if result.failure else f"order {claim.order_id}",
            )
        return result

    async def _closed(self, claim: KeyClaim) -> bool:
        """Whether the claim's run exists and has closed (False when that cannot be told)."""
        handle = self._client.get_workflow_handle(checkout_workflow_id(claim.checkout_id))
        try:
            description = await handle.describe(rpc_timeout=timedelta(seconds=5))
        except RPCError:
            return False
        return description.status not in (None, WorkflowExecutionStatus.RUNNING)

    async def _finished_start(self, claim: KeyClaim) -> StartResult:
        """The answer of the claim's run, which has closed."""
        try:
            state: CheckoutState | None = await self._query(claim.checkout_id)
        except ServiceError:
            # Not queryable: its history is gone, or it closed before its first workflow task
            # completed (terminated while opening).
            state = None
        if state is not None and state.start is not None:
            return state.start
        # The run closed without answering. It recorded no PaymentIntent (else the key's record
        # would have answered), so nobody holds its client_secret: its key is freed (the
        # reconciler settles its order, if it made one) and the request follows the key to a
        # new checkout.
        await self._keys.release_checkout(claim.checkout_id)
        return StartResult(
            failure=CheckoutFailure(
                code=ErrorCode.UNAVAILABLE,
                message="the checkout ended before it could answer; try again",
            )
        )

    async def _query(self, checkout_id: uuid.UUID) -> CheckoutState:
        handle = self._client.get_workflow_handle(checkout_workflow_id(checkout_id))
        try:
            return await handle.query(CheckoutWorkflow.state, rpc_timeout=timedelta(seconds=10))
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise NotFound(f"no checkout {checkout_id}") from exc
            raise temporal_unavailable(exc) from exc
        except WorkflowQueryFailedError as exc:
            raise temporal_unavailable(exc) from exc

    async def state(self, checkout_id: uuid.UUID, caller: Caller) -> CheckoutState:
        """The live state of the saga; from the order's rows if its history is gone."""
        logs.bind(checkout_id=checkout_id, workflow_id=checkout_workflow_id(checkout_id))
        order = await self._access.checkout_order(checkout_id, caller)
        try:
            return await self._query(checkout_id)
        except NotFound:
            if order is None:
                raise
        # Temporal no longer knows the run (retention, deletion): the order says how it ended.
        return CheckoutState(
            checkout_id=checkout_id,
            order_id=order.id,
            status=order.status,
            expires_at=order.expires_at,
            payment_attempts=[],
            request_fingerprint="",
        )

    async def cancel(self, order_id: uuid.UUID, caller: Caller) -> str:
        """Cancel a pending order's checkout; answers once the compensation is done."""
        view = await self._access.order(order_id, caller)
        _bind(view.order.checkout_id, order_id)
        status = view.order.status
        if status == OrderStatus.CANCELLED:
            return OrderStatus.CANCELLED
        if status != OrderStatus.PENDING_PAYMENT:
            raise InvalidState(f"the order is {status}", details={"status": status})
        handle = self._client.get_workflow_handle(checkout_workflow_id(view.order.checkout_id))
        try:
            result = await retry_while_busy(lambda: handle.execute_update(CheckoutWorkflow.cancel))
        except WorkflowUpdateFailedError as exc:
            raise _update_error(exc) from exc
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise temporal_unavailable(exc) from exc
            # The checkout finished meanwhile, or its run is gone (terminated, deleted).
            result_status = await self._orders.status(order_id)
            if result_status == OrderStatus.PENDING_PAYMENT:
                result_status = await self._cancel_lost(view)
            if result_status != OrderStatus.CANCELLED:
                raise InvalidState(
                    f"the order is {result_status}", details={"status": result_status}
                ) from exc
            return OrderStatus.CANCELLED
        if result.status != CheckoutStatus.CANCELLED:
            raise InvalidState(f"the order is {result.status}", details={"status": result.status})
        return OrderStatus.CANCELLED

    async def _cancel_lost(self, view: OrderView) -> str:
        """Cancel a pending order whose checkout has no run any more, as the saga would (the
        reconciler's own settling step, as a workflow of its own); returns the order's status."""
        order = view.order
        checkout = StaleCheckout(
            checkout_id=order.checkout_id,
            order_id=order.id,
            amount=order.total,
            currency=order.currency,
            payment_intent_id=view.payment.payment_intent_id if view.payment else None,
            expires_at=order.expires_at or order.created_at,
            workflow_status="NOT_FOUND",
        )
        try:
            await self._client.execute_workflow(
                SettleLostCheckoutWorkflow.run,
                SettleStaleCheckoutInput(checkout=checkout, close_as=OrderStatus.CANCELLED),
                id=lost_checkout_cancel_workflow_id(order.id),
                task_queue=self._task_queue,
                # Concurrent cancels wait for the same one.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Cancel of order {order.id}, whose checkout's run is gone",
            )
        except WorkflowAlreadyStartedError:
            pass
        except WorkflowFailureError as exc:
            raise Unavailable("the order could not be cancelled now; try again") from exc
        except RPCError as exc:
            raise temporal_unavailable(exc) from exc
        return await self._orders.status(order.id)
