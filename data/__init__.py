"""Data for Dreaming Out Loud: the generated world (world.py)."""
