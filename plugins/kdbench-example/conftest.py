"""Use kdbench's fixtures for plugin authors."""
from __future__ import annotations

pytest_plugins = ["kdbench.testing"]
