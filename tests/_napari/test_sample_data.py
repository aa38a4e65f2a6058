"""Sample data contributions: offline, through the manifest, right shapes."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel


@pytest.mark.parametrize(
    ("key", "shape", "dtype"),
    [
        ("cell", (660, 550), np.uint8),
        ("coins", (303, 384), np.uint8),
        ("nuclei", (384, 384), np.uint8),
        ("nuclei_stack", (8, 256, 256), np.uint16),
    ],
)
def test_samples_open_through_the_manifest(key, shape, dtype):
    from npe2 import PluginManager

    PluginManager.instance().discover()  # what napari does at start-up (installed plugin)
    viewer = ViewerModel()
    viewer.open_sample("napari-sam-lab", key)
    (layer,) = viewer.layers
    assert layer.data.shape == shape and layer.data.dtype == dtype
    assert float(layer.data.std()) > 0


def test_synthetic_samples_are_fixed():
    from napari_sam._napari._sample_data import nuclei

    first, second = nuclei()[0][0], nuclei()[0][0]
    np.testing.assert_array_equal(first, second)
