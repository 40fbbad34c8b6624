"""Data: built-in footage and weather physics, importers of real datasets, clips and the torch Dataset."""
