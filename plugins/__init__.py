"""Built-in graphopt pass families.

Each is registered as a plugin through the `graphopt` entry-point group.
"""
