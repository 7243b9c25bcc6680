"""A third-party compressseg plugin, as a lab would write one (used by tests/plugins)."""
