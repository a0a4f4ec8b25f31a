"""Turning a port inside a sandbox into a URL, and telling chat channels about it."""
