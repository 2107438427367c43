"""Pytest fixtures (registered from tests/conftest.py)."""
