"""Where a benchmark sends requests: simulated workers (sim, simworker, simkeys), real
ones (local, urls), the routers under test (routers) and a mock vLLM worker (mock)."""
