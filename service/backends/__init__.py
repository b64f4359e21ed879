"""Backends behind the one ``Backend`` interface (``base.py``): embedded engine, one SGLang URL."""
