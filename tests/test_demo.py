"""``dynconv demo --operators-only`` (the part of ``make demo`` after the video recipe, which has its own tests)."""

import os

import pytest
import torch

from dynconv import demo
from dynconv.functional import local_filter2d

pytestmark = pytest.mark.usefixtures("one_thread")


def test_swirl_filters_are_normalised_line_filters():
    k, size = 9, 21
    f = demo.swirl_filters(size, k)
    assert f.shape == (1, 1, k * k, size, size)
    assert torch.allclose(f.sum(2), torch.ones(1, 1, size, size))
    # a constant image stays constant away from the border (the filters are convex combinations)
    y = local_filter2d(torch.ones(1, 1, size, size), f, k)
    assert torch.allclose(y[..., k // 2 : -(k // 2), k // 2 : -(k // 2)], torch.ones(1, 1, size - k + 1, size - k + 1))
    # right of the centre the tangent is vertical: every row of the filter alike, most mass in the centre column
    taps = f[0, 0, :, size // 2, size // 2 + 3].reshape(k, k)
    assert torch.allclose(taps, taps[:1].expand(k, k), atol=1e-6)
    assert taps.sum(0).argmax() == k // 2 and taps[:, k // 2].sum() > 0.75
    # above the centre it is horizontal: every column alike
    taps = f[0, 0, :, size // 2 - 3, size // 2].reshape(k, k)
    assert torch.allclose(taps, taps[:, :1].expand(k, k), atol=1e-6) and taps.sum(1).argmax() == k // 2


def test_operators_only_writes_the_picture_and_the_benchmark(tmp_path, capsys):
    pytest.importorskip("PIL")
    assert demo.main(str(tmp_path), operators_only=True) == 0
    picture = tmp_path / "local_filter_swirl.png"
    assert picture.stat().st_size > 1000
    from PIL import Image

    with Image.open(picture) as img:  # input | filtered | filter grid, each 112 px, 4 px gaps, scaled x3
        assert img.size == (3 * (112 + 4 + 112 + 4 + 72), 3 * 112)
    rows = [
        r
        for r in (tmp_path / "bench_local_filter.md").read_text().splitlines()
        if r.startswith("| (") and "impl" not in r
    ]
    assert {r.split(" | ")[2] for r in rows} == {"unfold", "torch"} and len(rows) >= 4
    out = capsys.readouterr().out
    assert str(picture) in out and os.path.join(str(tmp_path), "bench_local_filter.md") in out
