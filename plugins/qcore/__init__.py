"""Built-in plugin qcore (under construction)."""
