"""Metering: the usage ledger (USAGE stream -> PostgreSQL), rollups, prices and usage queries."""
