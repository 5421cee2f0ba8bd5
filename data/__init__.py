"""Data for Dreaming Out Loud: the generated world (world.py, with talk.py, judge.py and benchmarks.py split off
by role) and loaders for outside data (text.py, images.py, vqa.py)."""
