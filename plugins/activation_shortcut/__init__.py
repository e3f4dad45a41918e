"""Built-in plugin activation_shortcut (under construction)."""
