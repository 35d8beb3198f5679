"""Query templates, and the disk cache of their compiled circuits.

A query is reduced to its *template*: its tensor arguments (subterms ``tensor(...)``) are
replaced, in order of first appearance, by placeholders ``tensor(gedi_slot(i))``, so
``addition(tensor(train(3)), tensor(train(8)), 11)`` becomes
``addition(tensor(gedi_slot(0)), tensor(gedi_slot(1)), 11)``; one input named twice gets one
slot. Each template is compiled once (:func:`gedi_nesy.logic.circuit.compile_circuit`) and its
:class:`~gedi_nesy.logic.circuit.Circuit` kept on disk by :class:`CircuitCache`, keyed by the
program, the template text and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from problog.logic import Constant, Term

from gedi_nesy.files import atomic_write, make_folder, remove_stale_temps
from gedi_nesy.logic.circuit import FORMAT_VERSION, Circuit

__all__ = [
    "SLOT",
    "CircuitCache",
    "default_cache_dir",
    "fill_slots",
    "has_slot",
    "query_template",
    "slot_index",
    "template_key",
]

SLOT = "gedi_slot"


# --------------------------------------------------------------------------- templates


def _slot(i: int) -> Term:
    return Term("tensor", Term(SLOT, Constant(i)))


def query_template(term: Term) -> tuple[Term, list[Term]]:
    """Replace the tensor arguments of a query by placeholders.

    Args:
        term: a query term, e.g. ``addition(tensor(train(3)), tensor(train(8)), 11)``.

    Returns:
        (template, slots): the term with each distinct ``tensor(...)`` subterm replaced by
        ``tensor(gedi_slot(i))``, i in order of first appearance (depth first, left to right),
        and the replaced subterms, ``slots[i]`` for placeholder i.
    """
    slots: dict[Term, Term] = {}

    def visit(t: Term) -> Term:
        if t.functor == "tensor" and t.arity == 1:
            if t not in slots:
                slots[t] = _slot(len(slots))
            return slots[t]
        if not t.args:
            return t
        return t.with_args(*[visit(a) for a in t.args])

    template = visit(term)
    return template, list(slots)


def template_key(term: Term, substitution: Mapping[Term, Term], slots: dict[Term, int]) -> Any:
    """A hashable structural key of a query's template (cheaper than building the template).

    Args:
        term: the query term before ``substitution`` is applied.
        substitution: a Query's substitution (placeholder term -> value), possibly empty.
        slots: filled with tensor term -> placeholder index, in order of first appearance.

    Returns:
        Nested tuples equal for two queries iff their templates are equal terms.
    """
    if substitution and term in substitution:
        return template_key(substitution[term], {}, slots)  # values are not substituted again
    if term.functor == "tensor" and term.arity == 1:
        return (SLOT, slots.setdefault(term, len(slots)))
    if not term.args:
        return (type(term), type(term.functor), term.functor)
    return (term.functor, *[template_key(a, substitution, slots) for a in term.args])


def slot_index(term: Term) -> int | None:
    """The index of a placeholder.

    Args:
        term: any term.

    Returns:
        i for a placeholder ``tensor(gedi_slot(i))``, else None.
    """
    if term.functor == "tensor" and term.arity == 1:
        inner = term.args[0]
        if inner.functor == SLOT and inner.arity == 1:
            return int(inner.args[0])
    return None


def has_slot(term: Term) -> bool:
    """Whether ``term`` holds a placeholder.

    Args:
        term: any term, e.g. the input of a template's neural atom.
    """
    stack = [term]
    while stack:
        t = stack.pop()
        if slot_index(t) is not None:
            return True
        stack.extend(t.args)
    return False


def fill_slots(term: Term, slots: Sequence[Term]) -> Term:
    """The inverse of :func:`query_template`.

    Args:
        term: a term with placeholders (a template, an answer or an atom's input).
        slots: the tensor terms of one query, ``slots[i]`` for placeholder i.

    Returns:
        ``term`` with placeholder i replaced by ``slots[i]``.
    """
    i = slot_index(term)
    if i is not None:
        return slots[i]
    if not term.args:
        return term
    return term.with_args(*[fill_slots(a, slots) for a in term.args])


# --------------------------------------------------------------------------- disk cache


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/gedi_nesy/compiled``, else ``~/.cache/gedi_nesy/compiled``.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The folder (not created).
    """
    env = os.environ if environ is None else environ
    root = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gedi_nesy" / "compiled"


class CircuitCache:
    """Compiled circuits on disk, one ``<sha256>.npz`` of plain arrays per template.

    The key hashes the program text, the template, the ProbLog / pysdd / DeepProbLog versions,
    the SDD option and :data:`FORMAT_VERSION`: an edited program or an upgrade misses. Files are
    written to a temporary file in the same folder and renamed (``os.replace``), so processes can
    share the folder; an unreadable or partial file, or one whose arrays no longer match their
    digest (altered after it was written), counts as a miss and is rewritten.

    Args:
        folder: where the files live (created on the first write).
        program_text: the program the circuits belong to.
        sdd_auto_gc: the SDD option the circuits are compiled with.
    """

    def __init__(self, folder: Path, program_text: str, *, sdd_auto_gc: bool) -> None:
        self.folder = Path(folder)
        self._salt = {
            "format": FORMAT_VERSION,
            "program": program_text,
            "sdd_auto_gc": sdd_auto_gc,
            "versions": {p: version(p) for p in ("problog", "pysdd", "deepproblog")},
        }

    def path(self, template: str) -> Path:
        """The file of one template (it may not exist)."""
        text = json.dumps({**self._salt, "template": template}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()}.npz"

    def load(self, template: str) -> Circuit | None:
        """The stored circuit of ``template``, or None (absent, unreadable, or not this one)."""
        try:
            with np.load(self.path(template), allow_pickle=False) as arrays:
                circuit = Circuit.from_arrays(arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return circuit if circuit.template == template else None

    def store(self, circuit: Circuit) -> Path:
        """Write one circuit atomically; returns its file."""
        path = self.path(circuit.template)
        make_folder(self.folder, "compiled-circuit cache folder (logic.cache_dir)")
        remove_stale_temps(self.folder, older_than_s=3600)  # other processes share the folder
        atomic_write(path, lambda f: np.savez(f, **circuit.to_arrays()))
        return path
