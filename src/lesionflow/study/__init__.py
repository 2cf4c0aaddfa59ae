"""The utility study: does synthetic data make the segmenter better? Grid design and statistics (pure)."""
