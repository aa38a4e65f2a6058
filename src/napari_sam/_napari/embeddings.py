"""The embeddings of a session: keys, the LRU cache and the one background encoder (no Qt).

Shared by every widget of a viewer (one model, one cache): the interactive
widget asks for the plane on screen, the automatic widget for any plane of
a stack (from its own worker, with :meth:`EmbeddingStore.compute`).

The background encoder may also pre-encode a plane nobody asked for yet (the
next slice of a stack): such a *prefetch* steps aside for interactive work
(it waits between layers while :meth:`EmbeddingStore.interactive` is
active), is abandoned when another plane is requested, is adopted when its
own plane is requested, and fails silently (the plane is then encoded, and
any error reported, when someone asks for it).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator

from napari.layers import Image

from napari_sam.predict import ImageEmbedding, encode_image

from . import _workers
from .cache import EmbeddingCache, EmbeddingKey
from .layers import ViewPlane, plane_image
from .models import ModelSlot


class PrefetchCancelled(Exception):
    """Raised inside a prefetch's encoder when its plane is no longer wanted."""


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
        self.prefetching = False  # the running job is a prefetch nobody asked for yet
        self._prefetch_failed: set[EmbeddingKey] = set()
        self._cancel = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
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

    def _work(self, image: Image, plane: ViewPlane, key: EmbeddingKey, gate=None):
        precision = self.models.precision  # read with the key: a later change bumps its token

        def work(model) -> ImageEmbedding:
            data = plane_image(image, plane)
            limits = key.contrast_limits
            options = {} if gate is None else {"between_layers": gate}
            return encode_image(
                model, data, rgb=image.rgb, contrast_limits=limits, precision=precision, **options
            )

        return work

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        """While active, a running prefetch pauses at its next layer (a click is computed)."""
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    def _gate(self, cancel: threading.Event) -> Callable[[], None]:
        """A prefetch's ``between_layers``: wait out interactive work, stop when cancelled."""

        def gate() -> None:
            self._idle.wait()
            if cancel.is_set():
                raise PrefetchCancelled

        return gate

    def cancel_prefetch(self, keep: EmbeddingKey | None = None) -> bool:
        """Abandon a running prefetch unless it encodes ``keep``; True if one was told to stop.

        It stops at its next layer; its ``on_done`` then runs as usual.
        """
        if self.job is None or not self.prefetching or self.job_key == keep:
            return False
        self._cancel.set()
        return True

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
        self,
        image: Image,
        plane: ViewPlane,
        on_done: Callable[[EmbeddingKey], None],
        *,
        prefetch: bool = False,
    ) -> bool:
        """Encode in a worker unless one runs (or this key just failed).

        ``on_done(key)`` runs on the main thread when the worker returns; the
        embedding is cached unless the model changed meanwhile (then dropped).

        Parameters
        ----------
        image : napari.layers.Image
        plane : ViewPlane
        on_done : callable
            Called with the key; for a prefetch also when it failed or was
            cancelled (without an embedding in the cache).
        prefetch : bool
            Encode a plane nobody asked for yet (see the module notes). A
            plain request for the plane a prefetch is encoding adopts it.

        Returns
        -------
        bool
            True if a worker was started.
        """
        key = self.key(image, plane)
        if self.job is not None and self.prefetching and self.job_key == key and not prefetch:
            self.prefetching = False  # adopted: from now on someone waits for it
            self._on_status(f"Computing the embedding of {image.name!r}…")
            return False
        if self.job is not None or key == self.failed_key or self.models.model is None:
            return False
        if prefetch and key in self._prefetch_failed:
            return False
        cancel = self._cancel = threading.Event()
        gate = self._gate(cancel) if prefetch else None
        model, name, work = self.models.model, image.name, self._work(image, plane, key, gate)
        if not prefetch:
            self._on_status(f"Computing the embedding of {name!r}…")

        def done(embedding: ImageEmbedding) -> None:
            self.job = self.job_key = None
            self.prefetching = False
            if key.model_token == self.models.token:
                self.cache.put(key, embedding)
            on_done(key)

        def failed(exc: BaseException) -> None:
            self.job = self.job_key = None
            if self.prefetching:  # nobody waits for it: say nothing, let a request retry it
                self.prefetching = False
                if not isinstance(exc, PrefetchCancelled):
                    self._prefetch_failed.add(key)
                on_done(key)
                return
            self.failed_key = key
            self._on_error(f"Could not compute the embedding of {name!r}: {exc}")

        self.job_key, self.prefetching = key, prefetch
        what = "pre-encoding" if prefetch else "embedding"
        self.job = _workers.start_worker(
            lambda: work(model),
            desc=f"SAM {what} of {name!r}",
            on_returned=done,
            on_errored=failed,
        )
        return True

    def discard_layer(self, image: Image) -> None:
        """Forget every embedding of ``image`` (its data or contrast changed)."""
        self.cache.discard_layer(self.token(image))
        self.failed_key = None
        self._prefetch_failed.clear()

    def clear(self) -> None:
        """Forget everything (the model changed)."""
        self.cache.clear()
        self.failed_key = None
        self._prefetch_failed.clear()
