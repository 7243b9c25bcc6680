"""Export formats, one module each. Every module here is imported on the first registry
lookup (``trainer.export.registry._discover``), so a new format is a new file with a class
decorated by ``@register_format``: nothing else to edit."""
