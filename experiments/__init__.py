"""What users run: datasets, the ``dgm`` command, reproducible experiments and reports."""
