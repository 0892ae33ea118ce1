"""Stage functions of the pipeline: plain typed Python over config objects and file paths.

Nothing in this package imports Prefect or MLflow; `flows/` wraps these functions.
"""
