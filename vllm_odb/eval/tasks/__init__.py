"""lm-eval task files (include path): odb_suite.yaml and its hooks (utils.py)."""
