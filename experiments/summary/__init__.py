"""Summaries of lifelong-editing runs: reading run folders (``runs``) and the scores (``metrics``).

The CLI is ``python -m experiments.summarize``; figures are in ``experiments.summary.plots``; the
notebook ``notebooks/summarize.ipynb`` imports both.
"""
