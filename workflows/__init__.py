"""Orchestration only: deterministic, no I/O. The checkout saga lives here."""
