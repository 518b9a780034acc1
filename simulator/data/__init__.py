"""Data sources: toy targets with exact densities, image sources, and the sample pool."""
