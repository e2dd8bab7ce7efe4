"""Evaluation: golden rewards, a pairwise LLM judge over the OpenAI API, reward accuracy, MT-Bench-style
grading, and the report with plots (jobs/evaluate.py)."""
