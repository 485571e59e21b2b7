"""The HTTP front door: FastAPI routes, error envelopes, forwarding over Ray handles."""
