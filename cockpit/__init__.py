"""Cockpit: an event hub for operations teams."""
