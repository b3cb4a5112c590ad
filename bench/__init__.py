"""Benchmarks, run by hand (``make bench``); each reports ratios against a baseline from the same run."""
