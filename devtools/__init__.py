"""The local stack `make run` and the tests start: embedded PostgreSQL, the Temporal dev server
and the Stripe stand-in, all real programs installed from PyPI."""
