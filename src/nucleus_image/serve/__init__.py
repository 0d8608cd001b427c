"""Serving: an HTTP API with request batching and a web page (`nucleus serve`; needs the `serve` extra)."""
