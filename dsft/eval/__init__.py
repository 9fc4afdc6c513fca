"""Evaluation and reporting: training logs (this package grows the eval, plan and report commands)."""
