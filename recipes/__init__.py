"""Recipe files (``recipes/<name>.yaml``) and the command that applies them (``recipes.apply``)."""
