#!/bin/sh
# The service's namespace and the custom search attributes its workflows write, on the stack's
# own Temporal server. Runs once per `docker compose up` in temporalio/admin-tools (the
# `temporal` CLI), after the server answers; the API and the worker wait for it to succeed.
#
# Idempotent: an existing namespace is kept as it is (its retention included), and only the
# search attributes it lacks are added. On SQL visibility, search attributes belong to one
# namespace, so they are created in TEMPORAL_NAMESPACE.
#
#   TEMPORAL_ADDRESS               host:port of the frontend
#   TEMPORAL_NAMESPACE             the namespace the API and the worker use
#   TEMPORAL_NAMESPACE_RETENTION   how long closed runs are kept (a new namespace only)
#   SEARCH_ATTRIBUTES              "Name=Type ..." (workflows/checkout.py's keys)
#   TEMPORAL_SETUP_ATTEMPTS        tries of each step, 2 s apart (default 60)
set -eu

: "${TEMPORAL_ADDRESS:?host:port of the Temporal frontend}"
: "${TEMPORAL_NAMESPACE:?the namespace to create}"
: "${SEARCH_ATTRIBUTES:?Name=Type pairs, space-separated}"
RETENTION="${TEMPORAL_NAMESPACE_RETENTION:-720h}"
ATTEMPTS="${TEMPORAL_SETUP_ATTEMPTS:-60}"

# A step the server may refuse for a moment: right after start-up, and right after the
# namespace is created (the frontends learn of it on their next namespace-cache refresh).
retry() {
    attempt=1
    until "$@"; do
        if [ "$attempt" -ge "$ATTEMPTS" ]; then
            echo "gave up after ${ATTEMPTS} attempts: $*" >&2
            return 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
}

temporal_cli() {
    temporal "$@" --address "$TEMPORAL_ADDRESS"
}

retry temporal_cli operator cluster health >/dev/null

if temporal_cli operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; then
    echo "namespace ${TEMPORAL_NAMESPACE}: exists"
else
    retry temporal_cli operator namespace create --namespace "$TEMPORAL_NAMESPACE" \
        --retention "$RETENTION" --description "checkout service"
    echo "namespace ${TEMPORAL_NAMESPACE}: created (retention ${RETENTION})"
fi

# `list` both waits for the new namespace to be known and tells which attributes exist.
existing=$(retry temporal_cli operator search-attribute list --namespace "$TEMPORAL_NAMESPACE")
for pair in $SEARCH_ATTRIBUTES; do
    name=${pair%%=*}
    kind=${pair#*=}
    if printf '%s\n' "$existing" | grep -qw -- "$name"; then
        echo "search attribute ${name}: exists"
        continue
    fi
    retry temporal_cli operator search-attribute create --namespace "$TEMPORAL_NAMESPACE" \
        --name "$name" --type "$kind"
    echo "search attribute ${name} (${kind}): created"
done
