"""Image search: building and searching an index, its files on disk, and the search page."""
