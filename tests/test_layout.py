import pytest

from offsite_kernels.emulator.layout import Layout, parse_layout, resolve_layout, uniform_indices
from offsite_kernels.errors import LayoutError


def test_uniform_matches_paper_opt_1_3b():
    # OPT-1.3B, 24 blocks, 2-8-2: 20 middle blocks, keep round(i * 19 / 7)
    layout = resolve_layout(24, 2, 2, 8)
    assert layout.emulator == tuple(2 + i for i in (0, 3, 5, 8, 11, 14, 16, 19))
    assert layout.kept_indices[:2] == (0, 1) and layout.kept_indices[-2:] == (22, 23)
    assert str(layout) == "2-8-2"


def test_uniform_rounds_half_to_even_like_the_paper_code():
    assert uniform_indices(6, 3) == [0, 2, 5]  # 2.5 -> 2
    assert uniform_indices(4, 3) == [0, 2, 3]  # 1.5 -> 2
    assert uniform_indices(9, 1) == [4]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]


def test_layout_sets_partition_the_model():
    layout = resolve_layout(48, 2, 2, 16)
    assert len(layout.kept_indices) == 20
    assert sorted(layout.kept_indices + layout.dropped_indices) == list(range(48))
    assert layout.adapter_positions() == (0, 1, 18, 19)


def test_explicit_strategy():
    layout = resolve_layout(10, 1, 1, strategy=[2, 5, 8])
    assert layout.emulator == (2, 5, 8)
    with pytest.raises(LayoutError, match="outside the middle"):
        resolve_layout(10, 1, 1, strategy=[0, 5])
    with pytest.raises(LayoutError, match="strictly increasing"):
        resolve_layout(10, 1, 1, strategy=[5, 5])
    with pytest.raises(LayoutError, match="3 block indices"):
        resolve_layout(10, 1, 1, emulator_layers=2, strategy=[2, 5, 8])


@pytest.mark.parametrize(
    "n, bottom, top, k, message",
    [
        (6, 3, 3, 1, "leaves no middle blocks"),
        (6, 4, 3, 1, "leaves no middle blocks"),
        (6, 1, 1, 5, "between 1 and the 4 middle blocks"),
        (6, 1, 1, 0, "between 1 and the 4 middle blocks"),
        (6, -1, 1, 2, ">= 0"),
    ],
)
def test_bad_layouts_name_the_problem(n, bottom, top, k, message):
    with pytest.raises(LayoutError, match=message):
        resolve_layout(n, bottom, top, k)


def test_parse_layout():
    assert parse_layout("2-8-2") == (2, 8, 2)
    assert parse_layout(" 0-1-3 ") == (0, 1, 3)
    for bad in ("2-8", "a-b-c", "2-8-2-1", "2--8-2", ""):
        with pytest.raises(LayoutError, match="BOTTOM-EMULATOR-TOP"):
            parse_layout(bad)


def test_layout_record_round_trip_and_validation():
    layout = resolve_layout(12, 2, 2, 4)
    assert Layout.from_dict(layout.to_dict()) == layout
    with pytest.raises(LayoutError):
        Layout.from_dict({"n_layers": 12, "bottom": 2, "top": 2, "emulator": [1]})
    with pytest.raises(LayoutError, match="malformed"):
        Layout.from_dict({"bottom": 2})
