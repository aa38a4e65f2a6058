"""Pure-PyTorch modules of the Segment Anything model family.

Nothing here imports the rest of :mod:`napari_sam` (except configuration
types for :func:`~napari_sam.models.sam.build_sam`), napari or Qt.
"""
