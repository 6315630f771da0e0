"""Data tools that need no torch: image download and checking, atomic file writes.

Kept apart from `component`, whose import registers the model classes and so loads torch and
transformers' model code; `download_image.py --help` should answer at once.
"""
