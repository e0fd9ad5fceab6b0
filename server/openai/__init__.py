"""The OpenAI `/v1/*` dialect."""
