"""Operator commands that talk to a running deployment over NATS: ``first keys``, ``first usage``."""
