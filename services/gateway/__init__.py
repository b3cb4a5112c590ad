"""The gateway: the OpenAI-compatible HTTP API, publishing requests to NATS and streaming answers as SSE."""
