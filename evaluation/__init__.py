"""Evaluation: metrics (docs/DESIGN.md section 4), reports, prediction files and figures."""
