"""Thin routes: one module per endpoint, no business logic."""
