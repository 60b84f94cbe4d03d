"""Benchmark scripts and the experiment helpers they share (not part of the installed package).

Run the scripts from the repository root (``python benchmarks/attention_vs_lstm.py``); notebooks
import the helpers as ``benchmarks.pedagogical_metrics`` and ``benchmarks.vae_baseline`` with the
repository root on ``sys.path``. A regular package (this file), so that no other ``benchmarks``
on the path shadows it.
"""
