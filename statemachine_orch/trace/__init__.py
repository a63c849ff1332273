"""Structured events through structlog, delivered as a lifecycle hook."""
