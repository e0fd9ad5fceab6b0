"""What the gateway dialects add on top of the capabilities: routing by task and preference,
the response cache, idempotency keys."""
