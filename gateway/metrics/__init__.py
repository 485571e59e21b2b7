"""Prometheus metrics: families kept per process, merged over the gateway, rendered once."""
