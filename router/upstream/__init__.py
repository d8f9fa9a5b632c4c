"""The workers behind each model: their state, health checks, vLLM metrics scraping and discovery."""
