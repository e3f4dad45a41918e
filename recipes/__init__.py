"""Shipped recipes (`edgeplug rewrite --recipe NAME`), installed as package data (edgeplug.recipes)."""
