#!/bin/sh
# Temporal's two databases on PostgreSQL, their schemas at the version this admin-tools image
# ships: the steps of Temporal's own compose setup (samples-server, scripts/setup-postgres.sh).
# Runs in temporalio/admin-tools, whose tag moves with temporalio/server's.
#
# Every step is idempotent, so the job runs at every `docker compose up`:
#   create-database  ignores a database that exists;
#   setup-schema -v 0.0  creates the version tables if missing and never lowers a version;
#   update-schema    applies only the versioned scripts newer than the database's version.
# Upgrading Temporal is therefore: move both tags together, `docker compose up -d`; the schema
# is brought forward before the server (which waits for this job) starts on it.
set -eu

: "${POSTGRES_SEEDS:?the PostgreSQL host of Temporal}"
: "${POSTGRES_USER:?the PostgreSQL user of Temporal}"
# temporal-sql-tool reads the password from SQL_PASSWORD: never on a command line.
: "${SQL_PASSWORD:?the password of POSTGRES_USER}"
PORT="${DB_PORT:-5432}"
SCHEMA_DIR=/etc/temporal/schema/postgresql/v12

sql_tool() {
    temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "$PORT" -u "$POSTGRES_USER" "$@"
}

setup() {
    database=$1
    schema=$2
    echo "temporal schema: ${database} (${schema})"
    sql_tool --db "$database" create-database
    sql_tool --db "$database" setup-schema -v 0.0
    sql_tool --db "$database" update-schema -d "${SCHEMA_DIR}/${schema}/versioned"
}

setup "${DBNAME:-temporal}" temporal
setup "${VISIBILITY_DBNAME:-temporal_visibility}" visibility
echo "temporal schema: up to date"
