"""Recipes besides the bi-level IRL loop: Inverse-RLignment (irlignment) and the baselines (baselines)."""
