"""The Prometheus exporter: the federation's workers, queues, nodes and events, from NATS."""
