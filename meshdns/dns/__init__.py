"""asyncio DNS transports (UDP, TCP) and the upstream forwarder."""
