"""Exact inference over ProbLog programs with neural predicates. The only subpackage that imports
deepproblog, problog and pysdd."""
