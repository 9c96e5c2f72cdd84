"""Ways in from outside the agent: the HTTP API with its SSE stream, Prometheus metrics and the dashboard."""
