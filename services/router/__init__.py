"""The router: knows workers from their heartbeats, picks one per request, holds requests while cold."""
