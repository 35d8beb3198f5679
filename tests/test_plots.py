"""The size plot's panels: error bars must belong to a line drawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from gedi_nesy.plots import save_panels_png


def test_error_bars_of_a_name_without_a_line_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"error bars for \['b'\] in panel 'raw' have no line"):
        save_panels_png([1], {"raw": {"a": [1]}}, tmp_path / "p.png", xlabel="x", ylabel="y",
                        yerr_panels={"raw": {"a": [0], "b": [0]}})  # fmt: skip
    with pytest.raises(ValueError, match="at least one line in every panel"):
        save_panels_png([1], {"raw": {}}, tmp_path / "p.png", xlabel="x", ylabel="y")
    assert list(tmp_path.iterdir()) == []  # nothing written on error
