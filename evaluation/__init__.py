"""Evaluation: metrics (DESIGN.md section 4), reports, prediction files and figures."""
