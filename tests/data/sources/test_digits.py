"""The `digits` source: scikit-learn's bundled handwritten digits with captions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mmtool.data.sources import build_source
from mmtool.errors import MMToolError


@pytest.fixture(scope="module")
def sk():
    return load_digits()


def test_length_ids_and_record_zero(sk):
    src = build_source("digits")
    assert len(src) == 1797 == len(sk.images)
    rec = src.read(0)
    assert rec.id == src.record_id(0) == "digits-0"
    assert rec.task == "caption" and rec.label == 0
    image, caption = rec.fields
    assert (image.modality, image.role) == ("image", "image")
    assert (caption.modality, caption.role, caption.data) == ("text", "caption", "a handwritten zero")
    assert image.data.dtype == np.uint8 and image.data.shape == (8, 8)
    expected = np.array([[round(v * 255 / 16) for v in row] for row in sk.images[0]], np.uint8)
    np.testing.assert_array_equal(image.data, expected)


def test_pixel_scale_endpoints_and_every_caption(sk):
    src = build_source("digits")
    # 0 -> 0, 8 -> 127.5 -> 128 (half up), 16 -> 255 over all pixels of all images
    recs = [src.read(i) for i in range(0, 1797, 97)]
    for i, rec in zip(range(0, 1797, 97), recs):
        raw = sk.images[i]
        img = rec.fields[0].data
        assert np.all(img[raw == 0] == 0) and np.all(img[raw == 16] == 255) and np.all(img[raw == 8] == 128)
        assert rec.label == sk.target[i]
    words = {src.read(i).label: src.read(i).fields[1].data for i in range(20)}
    assert words[7] == "a handwritten seven" and words[3] == "a handwritten three"
    assert len(set(words.values())) == 10


def test_caption_first_and_bad_option():
    rec = build_source("digits", ["caption_first=true"]).read(10)
    assert [f.role for f in rec.fields] == ["caption", "image"]
    with pytest.raises(MMToolError, match="caption_first"):
        build_source("digits", ["caption_first=maybe"])
    with pytest.raises(IndexError):
        build_source("digits").read(1797)
    with pytest.raises(IndexError):
        build_source("digits").read(-1)


def test_read_is_independent_and_does_not_alias_the_cache():
    a, b = build_source("digits"), build_source("digits")
    img = a.read(5).fields[0].data
    img[:] = 0  # a consumer scribbling on its copy must not change later reads
    np.testing.assert_array_equal(b.read(5).fields[0].data, a.read(5).fields[0].data)
    assert b.read(5).fields[0].data.any()
