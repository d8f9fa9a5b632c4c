"""Workers: their state, health checks, vLLM metrics scraping, discovery and local fleets."""
