"""The text-prompt widget's work, without Qt: CLIP choices, one run, its output layer, accept.

A :class:`TextRequest` freezes everything a run needs (layer, plane,
contrast, texts, options, a generation number); :func:`run_request` is the
worker body (model, cached embedding, CLIP, :func:`napari_sam.text.segment_text`);
:func:`show_result` writes the result into the widget's own Labels layer
with one feature row per object; :func:`accept_result` copies it into the
user's labels with :func:`napari_sam._napari.commit.commit_masks` (only
background filled, new ids, one undo step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels

from napari_sam._clip import import_open_clip
from napari_sam.automatic import AutomaticSettings
from napari_sam.text import AutomaticMaskCache, TextSegmentation, load_clip, segment_text

from .commit import CommitResult, commit_masks, write_preview
from .layers import ViewPlane, layers_to_prompts, plane_image, spatial_shape, view_plane
from .models import resolve_device
from .own_layers import make_labels_layer


@dataclass(frozen=True)
class ClipChoice:
    """One entry of the CLIP list: open_clip name and pretrained tag (or folder)."""

    label: str
    name: str
    pretrained: str
    note: str = ""


CLIP_CHOICES: tuple[ClipChoice, ...] = (
    ClipChoice("ViT-B-32 (OpenAI)", "ViT-B-32", "openai", "Fastest; a good start on a CPU"),
    ClipChoice(
        "ViT-B-16 (LAION-2B)", "ViT-B-16", "laion2b_s34b_b88k", "Finer detail, 4x the compute"
    ),
    ClipChoice("ViT-L-14 (DataComp-XL)", "ViT-L-14", "datacomp_xl_s13b_b90k", "Best; use a GPU"),
)


def folder_choice(folder: str | Path) -> ClipChoice:
    """A CLIP choice for an open_clip ``local-dir`` folder (config + weights)."""
    folder = Path(folder).expanduser()
    return ClipChoice(f"{folder.name} (folder)", "", f"local-dir:{folder}", str(folder))


class ClipSlot:
    """The widget's CLIP model: loaded on first use (in the worker), or injected."""

    def __init__(self, choice: ClipChoice = CLIP_CHOICES[0]) -> None:
        self.choice = choice
        self.clip = None
        self._lock = threading.Lock()

    def set_choice(self, choice: ClipChoice) -> None:
        """Use another CLIP (loaded when needed)."""
        if choice != self.choice:
            self.choice, self.clip = choice, None

    def set_clip(self, clip, *, label: str = "custom CLIP") -> None:
        """Use an already loaded ClipModel (scripts, tests)."""
        self.choice, self.clip = ClipChoice(label, getattr(clip, "name", ""), ""), clip

    def prepare(self) -> None:
        """Import open_clip now, in the calling (main) thread, if a load is pending.

        Its first import pulls in torchvision and triton's native modules,
        which crashed (segfault) when first imported in a worker thread with
        Qt running; an ImportError (install hint) also shows at once.
        """
        if self.clip is None:
            import_open_clip()

    def ensure(self, device: str):
        """The loaded CLIP (loading, or downloading, it in this thread if needed)."""
        with self._lock:
            if self.clip is None:
                choice = self.choice
                name = choice.name or "ViT-B-32"
                self.clip = load_clip(name, choice.pretrained, device=resolve_device(device))
            return self.clip


def split_texts(text: str) -> tuple[str, ...]:
    """``"nucleus; mitotic cell"`` -> ``("nucleus", "mitotic cell")`` (one class each)."""
    parts = [" ".join(p.split()) for p in text.split(";")]
    return tuple(dict.fromkeys(p for p in parts if p))


@dataclass(frozen=True, eq=False)
class TextRequest:
    """Everything one run needs, fixed when the user presses Enter."""

    image: Image
    plane: ViewPlane
    contrast_limits: tuple[float, float]
    texts: tuple[str, ...]
    threshold: float
    top_k: int | None
    points_xy: np.ndarray | None
    boxes_xyxy: np.ndarray | None
    generation: int


def session_prompts(session, image: Image, plane: ViewPlane) -> tuple:
    """``(points_xy, boxes_xyxy)`` of the session's prompt layers on ``plane`` (None if empty)."""
    if session.image_layer is not image or session.points_layer is None:
        return None, None
    prompts = layers_to_prompts(session.points_layer, session.boxes_layer, image, plane)
    points = prompts.points_xy[prompts.point_labels == 1]
    return (points if len(points) else None), (
        prompts.boxes_xyxy if len(prompts.boxes_xyxy) else None
    )


def make_request(
    session,
    image: Image | None,
    text: str,
    *,
    threshold: float,
    top_k: int | None,
    use_prompts: bool,
    generation: int,
) -> TextRequest:
    """Freeze the inputs of a run on the plane of ``image`` on screen.

    Raises
    ------
    ValueError
        With a message for the user: no image or text, not a 2D view, or
        ``use_prompts`` without SAM points or boxes on this plane.
    """
    texts = split_texts(text)
    if not texts or image is None:
        raise ValueError("Choose an image and type a text, e.g. nucleus.")
    plane = view_plane(image, session.viewer.dims)
    points = boxes = None
    if use_prompts:
        points, boxes = session_prompts(session, image, plane)
        if points is None and boxes is None:
            raise ValueError("No SAM points or boxes on this slice (or another image).")
    return TextRequest(
        image=image,
        plane=plane,
        contrast_limits=tuple(float(v) for v in image.contrast_limits),
        texts=texts,
        threshold=float(threshold),
        top_k=top_k,
        points_xy=points,
        boxes_xyxy=boxes,
        generation=generation,
    )


def run_request(
    request: TextRequest,
    session,
    clip_slot: ClipSlot,
    mask_cache: AutomaticMaskCache,
    settings: AutomaticSettings,
    *,
    progress: Callable[[int, int], None] | None,
    cancel: Callable[[], bool] | None,
) -> TextSegmentation:
    """The worker body: SAM (shared session), its cached embedding, CLIP, segment_text."""
    model = session.models.ensure()
    embedding = session.embeddings.compute(request.image, request.plane)
    clip = clip_slot.ensure(session.models.device)
    return segment_text(
        model,
        clip,
        embedding,
        request.texts,
        image=plane_image(request.image, request.plane),
        rgb=request.image.rgb,
        contrast_limits=request.contrast_limits,
        points_xy=request.points_xy,
        boxes_xyxy=request.boxes_xyxy,
        top_k=request.top_k,
        threshold=request.threshold,
        automatic=settings,
        mask_cache=mask_cache,
        progress=progress,
        cancel=cancel,
    )


def features_of(result: TextSegmentation) -> dict[str, np.ndarray]:
    """Layer features: one row per object, ``index`` = its label id."""
    objects = result.objects
    return {
        "index": np.array([o.label for o in objects], dtype=np.int64),
        "text": np.array([o.text for o in objects], dtype=object),
        "score": np.array([o.score for o in objects], dtype=np.float64),
        "relative_score": np.array([o.relative_score for o in objects], dtype=np.float64),
        "area": np.array([o.area for o in objects], dtype=np.int64),
    }


def output_layer_for(viewer, layer: Labels | None, image: Image) -> Labels:
    """The widget's output layer for ``image`` (a new one if missing or of another shape)."""
    if layer is not None and layer in viewer.layers:
        if tuple(np.shape(layer.data)) == spatial_shape(image):
            return layer
        viewer.layers.remove(layer)
    return viewer.add_layer(
        make_labels_layer(image, name=f"{image.name} text objects", dtype=np.uint32, opacity=0.6)
    )


def show_result(
    layer: Labels, request: TextRequest, result: TextSegmentation, previous: ViewPlane | None
) -> None:
    """Replace the output layer's content by ``result`` on the request's plane."""
    write_preview(layer, request.plane, [o.segmentation for o in result.objects], previous)
    layer.features = features_of(result)


def accept_result(
    target: Labels, request: TextRequest, result: TextSegmentation, *, min_score: float = 0.0
) -> CommitResult:
    """Copy the objects scoring ``>= min_score`` into ``target``: background only, new ids."""
    masks = [o.segmentation for o in result.objects if o.score >= min_score]
    return commit_masks(target, request.plane, masks, mode="keep", id_policy="next_free")
