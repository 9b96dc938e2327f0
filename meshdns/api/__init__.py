"""The HTTP API (aiohttp): registry sync, explain, health, readiness, metrics."""
