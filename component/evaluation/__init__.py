"""Retrieval metrics: the toolkit's own and Chinese-CLIP's evaluation protocol."""
