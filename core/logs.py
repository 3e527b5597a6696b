"""One logging setup for every process (`python -m api`, the worker, the outbox relay).

`LOG_FORMAT=json` (the default outside development) writes one JSON object per line through
python-json-logger; `text` writes lines for people. Either way every line carries the ids of
what it is about, wherever they are known:

- `request_id`: the API's request (`X-Request-ID`, or generated; `api.metrics` sets it);
- `checkout_id`, `order_id`: bound by the API's services and, in the worker, by the activity
  interceptor (`core.metrics.ActivityTelemetry`) from the activity's input; the workflow passes
  them in `workflow.logger`'s `extra` (which the SDK silences on replay);
- `workflow_id`: the same, or lifted from the SDK's own `temporal_workflow` /
  `temporal_activity` fields;
- `trace_id`, `span_id`: the OpenTelemetry span current when the line was written.

The ids live in one context variable, so an asyncio task (a request, an activity) sees its own.
Whatever a line says, anything shaped like a Stripe key, a webhook secret, a client secret, an
order access token or a bearer credential is masked before it is written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Final

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from temporalio import activity, workflow

from core.settings import LogSettings

# The fields a line carries when they are known, in the order text lines show them.
ID_FIELDS: Final = ("request_id", "checkout_id", "order_id", "workflow_id")

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
_ids: ContextVar[Mapping[str, str]] = ContextVar("log_ids", default=_EMPTY)

# Credentials by their shape: Stripe keys (sk_/rk_), webhook secrets (whsec_), PaymentIntent
# client secrets (pi_..._secret_...), order access tokens (ot_ + 64), cart tokens (ct_ + 43),
# and whatever follows "Bearer". A second line of defence: nothing logs them knowingly
# (tests/e2e check both).
SECRET_PATTERN: Final = re.compile(
    r"\b(?:sk|rk)_(?:live|test)_\w+"
    r"|\bwhsec_\w+"
    r"|\b\w+_secret_\w+"
    r"|\bot_[\w-]{16,}"
    r"|\bct_[\w-]{16,}"
    r"|(?i:bearer)\s+[^\s\"',;]+"
)
REDACTED: Final = "[redacted]"


def redact(text: str) -> str:
    return SECRET_PATTERN.sub(REDACTED, text)


def bind(**ids: object) -> None:
    """Add ids (None ignored) to every line this task writes from now on."""
    given = {name: str(value) for name, value in ids.items() if value is not None}
    if given:
        _ids.set({**_ids.get(), **given})


def start_request(request_id: str) -> None:
    """A new request: its id, and nothing left over from an earlier one."""
    _ids.set({"request_id": request_id})


def bound() -> Mapping[str, str]:
    return _ids.get()


class ContextFilter(logging.Filter):
    """Puts the task's ids, the SDK's workflow id and the current span on the record. What a
    logging call passed itself (`extra=`) wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for name, value in _ids.get().items():
            fields.setdefault(name, value)
        if "workflow_id" not in fields:
            temporal = fields.get("temporal_workflow") or fields.get("temporal_activity")
            if isinstance(temporal, Mapping) and temporal.get("workflow_id"):
                fields["workflow_id"] = temporal["workflow_id"]
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            fields.setdefault("trace_id", format(span.trace_id, "032x"))
            fields.setdefault("span_id", format(span.span_id, "016x"))
        return True


class RedactingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message [request_id=... checkout_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s%(ids)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{name}={record.__dict__[name]}" for name in ID_FIELDS if record.__dict__.get(name)]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return redact(super().format(record))


def json_formatter(service: str) -> logging.Formatter:
    return RedactingJsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"service": service},
        timestamp="time",
        # Not fields: the raw entry of Core's forwarded records (its message is the line), and
        # uvicorn's message again with terminal colours.
        reserved_attrs=[*RESERVED_ATTRS, "temporal_log", "color_message", "ids"],
    )


def handler(settings: LogSettings, service: str) -> logging.Handler:
    """The one handler every logger writes through (stderr), with the ids filter."""
    out = logging.StreamHandler(sys.stderr)
    out.addFilter(ContextFilter())
    out.setFormatter(json_formatter(service) if settings.log_as_json else TextFormatter())
    return out


def configure_logging(settings: LogSettings, *, service: str) -> None:
    """Route every logger (ours, uvicorn's, the SDKs') through one handler on the root logger.

    `service` names the process in JSON lines (`api`, `worker`, `relay`)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(settings, service))
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # The Stripe SDK logs every request and response at INFO: about 5 % of the worker's CPU
    # under load (py-spy, `make bench`), and nothing an operator needs (errors still show).
    logging.getLogger("stripe").setLevel(logging.WARNING)
    # The SDK appends its workflow / activity details to the message as a dict's repr; they
    # are fields of the record already (`temporal_workflow`, `temporal_activity`).
    workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False
