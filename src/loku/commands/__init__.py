"""Typer sub-apps for feature commands; registered by loku.cli."""
