"""The package version (read by the facade, provenance records and the listing cache)."""
from __future__ import annotations

__version__ = "0.1.0"
