"""Shared pieces of the checkout service: settings, database, errors and the stock ledger."""
