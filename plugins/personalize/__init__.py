"""Built-in plugin personalize (under construction)."""
