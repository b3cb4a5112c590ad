"""Code shared by every FIRST service: wire schema, subjects, config, logging, embedded NATS, client."""
