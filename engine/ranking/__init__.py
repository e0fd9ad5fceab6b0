"""Rerank and moderation."""
