"""Routing policies: one small synchronous interface, one module per policy."""
