"""One-run privacy auditing: estimators, canaries in the pipeline, and reports."""
