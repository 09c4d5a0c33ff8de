"""Data: image transforms (datasets and collation land with the training issue)."""
