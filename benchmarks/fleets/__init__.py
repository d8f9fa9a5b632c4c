"""Fleets a benchmark runs against: simulated (sim, simworker, simkeys) or real (local, urls)."""
