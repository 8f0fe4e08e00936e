"""Jinja2 templates of the generated training project."""
