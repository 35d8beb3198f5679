"""Benchmarks: methods x seeds (x data sizes) of joint-training runs, and their report."""
