"""kvroute: a prefix-aware, cost-aware router for vLLM fleets."""

from kvroute import __version__

__all__ = ["__version__"]
