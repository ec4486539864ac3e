"""Binaries that export retrained networks for TF-Serving and query a server."""
