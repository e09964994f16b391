"""Toy text-to-image world (coloured shapes in quadrants) and its model-free reward."""
