"""Reasoning shortcuts: the audit of the concept maps a task's data allow, the logic-guided
relabelling of concept values, and the concept and clustering metrics."""
