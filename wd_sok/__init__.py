"""wd-sok: Wide & Deep with model-parallel embeddings."""
