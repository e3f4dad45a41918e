"""Built-in plugin lls (under construction)."""
