"""pytest configuration: trio mode is set in setup.cfg; shared helpers live in helpers.py."""
