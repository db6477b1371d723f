"""distill.spread: the spread of a timing's repeats, and the mark of a figure whose repeats disagree."""
from __future__ import annotations

import pytest

from distill.spread import LEGEND, NOISY, mark, spread


def test_a_quarter_apart_is_noise_a_tenth_is_not():
    wide = spread([100.0, 90.0, 115.0])  # (115 - 90) / 100 = 25 %
    assert wide == {"min": 90.0, "median": 100.0, "max": 115.0, "spread": 0.25, "noisy": True, "repeats": 3}
    assert mark(wide) == " ±25%"
    narrow = spread([100.0, 95.0, 105.0, 98.0])  # (105 - 95) / 99 = 10 %
    assert narrow["spread"] == 0.101 and narrow["median"] == 99.0 and not narrow["noisy"]
    assert mark(narrow) == "" and mark(None) == ""
    assert spread([100.0, 90.0, 110.0])["spread"] == NOISY == 0.2 and not spread([100.0, 90.0, 110.0])["noisy"]  # 20 %: not past it
    assert spread([3.0])["spread"] == 0.0  # one repeat: nothing to disagree with
    assert "20%" in LEGEND
    with pytest.raises(ValueError):
        spread([])
