"""The embeddings of a session: keys, the LRU cache and the one background encoder (no Qt).

Shared by every widget of a viewer (one model, one cache): the interactive
widget asks for the plane on screen, the automatic widget for any plane of
a stack (from its own worker, with :meth:`EmbeddingStore.compute`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from napari.layers import Image

from napari_sam.predict import ImageEmbedding, encode_image

from . import _workers
from .cache import EmbeddingCache, EmbeddingKey
from .layers import ViewPlane, plane_image
from .models import ModelSlot


class EmbeddingStore:
    """Embeddings keyed by layer, plane, contrast limits and model generation.

    Each is encoded in the precision of ``models`` (a change of precision
    bumps the model generation, so embeddings of the old one are not reused).

    Parameters
    ----------
    models : ModelSlot
        Where the model comes from (its ``token`` is part of every key) and its precision.
    max_bytes : int
        Memory bound of the cache.
    on_status, on_error : callable
        Called with a message.
    """

    def __init__(
        self,
        models: ModelSlot,
        *,
        max_bytes: int,
        on_status: Callable[[str], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.models = models
        self.cache = EmbeddingCache(max_bytes)
        self.job = None
        self.job_key: EmbeddingKey | None = None
        self.failed_key: EmbeddingKey | None = None
        self._tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next_token = 0
        self._lock = threading.Lock()
        self._on_status, self._on_error = on_status, on_error

    def token(self, layer: Image) -> int:
        """Stable per-session number of ``layer`` (names can change, tokens do not)."""
        with self._lock:
            if layer not in self._tokens:
                self._next_token += 1
                self._tokens[layer] = self._next_token
            return self._tokens[layer]

    def key(self, image: Image, plane: ViewPlane) -> EmbeddingKey:
        """Key of ``plane`` of ``image`` under its current contrast limits and model."""
        limits = tuple(float(v) for v in image.contrast_limits)
        return EmbeddingKey(self.token(image), plane.key, limits, self.models.token)

    def get(self, image: Image, plane: ViewPlane) -> ImageEmbedding | None:
        """The cached embedding, or None."""
        return self.cache.get(self.key(image, plane))

    def _work(self, image: Image, plane: ViewPlane, key: EmbeddingKey):
        precision = self.models.precision  # read with the key: a later change bumps its token

        def work(model) -> ImageEmbedding:
            data = plane_image(image, plane)
            limits = key.contrast_limits
            return encode_image(
                model, data, rgb=image.rgb, contrast_limits=limits, precision=precision
            )

        return work

    def compute(self, image: Image, plane: ViewPlane) -> ImageEmbedding:
        """The embedding, computed in this thread if not cached (loads the model if needed)."""
        key = self.key(image, plane)
        embedding = self.cache.get(key)
        if embedding is None:
            embedding = self._work(image, plane, key)(self.models.ensure())
            if key.model_token == self.models.token:
                self.cache.put(key, embedding)
        return embedding

    def compute_here(self, image: Image, plane: ViewPlane) -> bool:
        """:meth:`compute`, reporting a failure through ``on_error``; True on success."""
        key = self.key(image, plane)
        if key == self.failed_key:
            return False
        try:
            self.compute(image, plane)
        except (TypeError, ValueError, RuntimeError) as exc:
            self.failed_key = key
            self._on_error(f"Could not compute the embedding of {image.name!r}: {exc}")
            return False
        return True

    def start(
        self, image: Image, plane: ViewPlane, on_done: Callable[[EmbeddingKey], None]
    ) -> bool:
        """Encode in a worker unless one runs (or this key just failed).

        ``on_done(key)`` runs on the main thread when the worker returns; the
        embedding is cached unless the model changed meanwhile (then dropped).

        Returns
        -------
        bool
            True if a worker was started.
        """
        key = self.key(image, plane)
        if self.job is not None or key == self.failed_key or self.models.model is None:
            return False
        model, name, work = self.models.model, image.name, self._work(image, plane, key)
        self._on_status(f"Computing the embedding of {name!r}…")

        def done(embedding: ImageEmbedding) -> None:
            self.job = self.job_key = None
            if key.model_token == self.models.token:
                self.cache.put(key, embedding)
            on_done(key)

        def failed(exc: BaseException) -> None:
            self.job = self.job_key = None
            self.failed_key = key
            self._on_error(f"Could not compute the embedding of {name!r}: {exc}")

        self.job_key = key
        self.job = _workers.start_worker(
            lambda: work(model),
            desc=f"SAM embedding of {name!r}",
            on_returned=done,
            on_errored=failed,
        )
        return True

    def discard_layer(self, image: Image) -> None:
        """Forget every embedding of ``image`` (its data or contrast changed)."""
        self.cache.discard_layer(self.token(image))
        self.failed_key = None

    def clear(self) -> None:
        """Forget everything (the model changed)."""
        self.cache.clear()
        self.failed_key = None
