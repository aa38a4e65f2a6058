"""A memory-bounded, least-recently-used cache of image embeddings (no Qt).

Keys say exactly what produced an embedding: which image layer (a token,
never the layer name), which plane of it, under which contrast limits, with
which model. Returning to a slice is then instant, and an embedding can
never be used for another slice, contrast or model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from napari_sam.predict import ImageEmbedding


@dataclass(frozen=True)
class EmbeddingKey:
    """Identity of one embedding.

    Attributes
    ----------
    layer_token : int
        Per-session token of the image layer (stable while the layer lives).
    plane : tuple
        :attr:`napari_sam._napari.layers.ViewPlane.key` of the plane encoded.
    contrast_limits : tuple of float or None
        Display range the image was mapped with (None: automatic range).
    model_token : int
        Generation of the session's model; bumps whenever the model changes.
    """

    layer_token: int
    plane: tuple
    contrast_limits: tuple[float, float] | None
    model_token: int


def embedding_nbytes(embedding: ImageEmbedding) -> int:
    """Bytes held by ``embedding.features``."""
    features = embedding.features
    return int(features.element_size() * features.nelement())


class EmbeddingCache:
    """LRU cache of :class:`ImageEmbedding` bounded by total bytes (thread-safe).

    Parameters
    ----------
    max_bytes : int
        Upper bound of the summed feature sizes; the least recently used
        entries are dropped to stay under it (one entry is always kept).
        A ViT-B embedding (256 x 64 x 64 float32) takes 4 MiB.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive; received {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[EmbeddingKey, ImageEmbedding] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: EmbeddingKey) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._nbytes

    def keys(self) -> list[EmbeddingKey]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def get(self, key: EmbeddingKey) -> ImageEmbedding | None:
        """The embedding for ``key`` (marked most recently used), or None."""
        with self._lock:
            embedding = self._items.get(key)
            if embedding is not None:
                self._items.move_to_end(key)
            return embedding

    def put(self, key: EmbeddingKey, embedding: ImageEmbedding) -> None:
        """Store ``embedding`` under ``key``, dropping old entries beyond ``max_bytes``."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= embedding_nbytes(old)
            self._items[key] = embedding
            self._nbytes += embedding_nbytes(embedding)
            while self._nbytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._nbytes -= embedding_nbytes(dropped)

    def discard_layer(self, layer_token: int) -> int:
        """Drop every entry of one image layer; return how many were dropped."""
        with self._lock:
            doomed = [k for k in self._items if k.layer_token == layer_token]
            for key in doomed:
                self._nbytes -= embedding_nbytes(self._items.pop(key))
            return len(doomed)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._nbytes = 0
