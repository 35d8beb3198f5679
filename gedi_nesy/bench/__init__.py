"""Benchmarks: methods x seeds (x data sizes) of joint-training runs, and their report.

``plan`` (the bench config, its trials and their run configs), ``run`` (trials in processes,
locks, resume), ``report`` (results.csv, summary.md, restart selection, figures).
"""
