"""Integrations with other libraries (imported lazily: analog never requires them)."""
