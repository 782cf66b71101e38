"""The edge: OpenAI-compatible HTTP + SSE and WebSocket in front of the bus."""
