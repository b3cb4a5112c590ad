"""The batch service: OpenAI batches run line by line through the request path, durably (docs/batch.md)."""
