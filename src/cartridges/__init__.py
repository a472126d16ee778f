"""Cartridges: small trained KV caches that stand in for a long corpus."""

__version__ = "0.1.0"
