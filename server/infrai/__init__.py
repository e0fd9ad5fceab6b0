"""The `/v1/ai/*` gateway dialect (seed 001): a thin translation onto the one engine."""
