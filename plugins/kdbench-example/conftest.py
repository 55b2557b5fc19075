"""Use kdbench's fixtures for plugin authors."""

pytest_plugins = ["kdbench.testing"]
