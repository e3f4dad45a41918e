"""Fleet training on Flower (under construction)."""
