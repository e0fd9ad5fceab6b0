"""The QuantCDN-style `/api/v3/organizations/{organisation}/ai/*` dialect (seed 002), camelCase
JSON as the published `quantcdn-client` sends it: a thin translation onto the one engine."""
