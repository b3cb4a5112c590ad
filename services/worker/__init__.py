"""The worker: the shim on an HPC node that drives one engine and serves its requests over NATS."""
