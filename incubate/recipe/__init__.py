"""The recipe: its typed schema (schema.py, typed.py), the registries its names are checked against (registries.py) and the one checker of its values (checks.py)."""
