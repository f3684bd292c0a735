"""Seeing the routing: per-language routing of a trained run and the HTML run report."""
