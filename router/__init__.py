"""kvroute: a prefix-aware, cost-aware router for vLLM fleets."""

__version__ = "0.1.0"
