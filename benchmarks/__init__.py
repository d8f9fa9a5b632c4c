"""kvroute's routing benchmarks: workloads, fleets (simulated and real), runner and report.

Run them as ``kvroute bench ...`` or ``python -m kvroute.benchmarks.cli ...``.
"""
