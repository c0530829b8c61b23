"""Built-in graphopt pass families, each registered as a plugin through the `graphopt` entry-point group."""
