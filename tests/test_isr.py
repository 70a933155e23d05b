"""ISR spec parsing."""
import pytest

import edaformer


def test_parse_isr_forms():
    assert edaformer.parse_isr("2211-222") == edaformer.parse_isr(((2, 2, 1, 1), (2, 2, 2)))
    assert edaformer.parse_isr(" 4,2,2,1 - 2,2,2 ").encoder == (4, 2, 2, 1)
    assert str(edaformer.parse_isr(((16, 2, 1, 1), (2, 2, 2)))) == "16,2,1,1-2,2,2"


@pytest.mark.parametrize("spec,match", [
    ("221-222", "encoder needs 4 factors"),
    ("2211-22", "decoder needs 3 factors"),
    ("2201-222", "encoder factor 0 must be >= 1"),
    ("22a1-222", "expected 4 encoder digits"),
    ("2211222", "expected 4 encoder digits"),
    ((2, 2, 1), "give \\(encoder 4-tuple, decoder 3-tuple\\)"),
    (((2, 2, 1, 1), (2, 2, 0)), "decoder factor 0"),
    (((2, 2, 1, 1.5), (2, 2, 2)), "not a positive integer"),
])
def test_bad_isr_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        edaformer.parse_isr(spec)
