"""Demonstration and preference data: schemas, readers (local files, Hub names, offline sets), tokenisation."""
