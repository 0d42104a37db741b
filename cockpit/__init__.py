"""Cockpit: an event hub for operations teams."""

__version__ = "0.1.0"  # the one place it is set: setup.py reads it, twistd cockpit --version and /api/health show it
