"""Free-text prompts: SAM proposes candidate masks, CLIP says which ones the text means.

The released SAM has no text encoder, so :func:`segment_text` works the
practical way:

1. candidates: the automatic masks of the image (:func:`~napari_sam.automatic.generate_masks`,
   reused through an :class:`AutomaticMaskCache`), or masks you pass;
   optionally only those containing a point or lying inside a box;
2. each candidate is cropped to a square around its box with a margin, the
   outside of its mask suppressed (:class:`CropSettings`), resized to CLIP's
   input and embedded, in batches;
3. each text is embedded through prompt templates (photo- and
   microscopy-flavoured, :data:`DEFAULT_TEMPLATES`), averaged;
4. calibrated score of candidate ``n`` for text ``t``: the softmax of CLIP's
   logits over ``{t} + negative_texts``, i.e. the probability that the crop
   shows ``t`` rather than, say, "background"; with several texts each
   candidate takes the text it scores highest, so one text = one class.

Candidates scoring at least ``threshold`` are returned as :class:`TextMatch`
records, best first (at most ``top_k`` per text), with a label image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ._clip import ClipModel, ClipWeightsUnavailableError, clip_cache_dir, load_clip
from ._rle import RunLengthMask
from ._text_candidates import (
    AutomaticMaskCache,
    Candidate,
    allowed_candidates,
    as_candidates,
    prompt_array,
)
from ._text_crops import SUPPRESS_MODES, CropSettings
from ._text_scoring import (
    Scores,
    Steps,
    check_selection,
    check_templates,
    embed_candidates,
    embed_texts,
    score_candidates,
    select,
    text_list,
)
from .automatic import AutomaticSettings, Cancelled, MaskRecord, records_to_labels
from .image import prepare_image
from .predict import ImageEmbedding

if TYPE_CHECKING:
    from .models.sam import Sam

__all__ = [
    "DEFAULT_NEGATIVE_TEXTS",
    "DEFAULT_TEMPLATES",
    "SUPPRESS_MODES",
    "AutomaticMaskCache",
    "Cancelled",
    "ClipEncoder",
    "ClipModel",
    "ClipWeightsUnavailableError",
    "CropSettings",
    "TextMatch",
    "TextSegmentation",
    "clip_cache_dir",
    "embed_texts",
    "load_clip",
    "segment_text",
]

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a microscopy image of a {}.",
    "a fluorescence microscopy image of a {}.",
    "a light microscope image of a {}.",
    "an electron microscopy image of a {}.",
    "a histology image of a {}.",
    "a {} under the microscope.",
)
DEFAULT_NEGATIVE_TEXTS: tuple[str, ...] = ("background",)


class ClipEncoder(Protocol):
    """What :func:`segment_text` needs from CLIP (:class:`ClipModel` has it)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def logit_scale(self) -> float: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class TextMatch:
    """One selected object.

    Attributes
    ----------
    label : int
        Its id in :attr:`TextSegmentation.labels`.
    text : str
        The text it matched (its class).
    text_index : int
        Index of ``text`` in :attr:`TextSegmentation.texts`.
    score : float
        Probability that the crop shows ``text`` rather than a negative text.
    relative_score : float
        Softmax of ``text``'s logit across all candidates (sums to 1 over them):
        how this object compares with the other candidates.
    similarity : float
        Cosine similarity of the crop and text embeddings.
    candidate_index : int
        Index in the candidate list.
    bbox_xywh : tuple of int
        Box, :class:`~napari_sam.automatic.MaskRecord` convention.
    area : int
        Mask pixels.
    rle : RunLengthMask
        The mask.
    """

    label: int
    text: str
    text_index: int
    score: float
    relative_score: float
    similarity: float
    candidate_index: int
    bbox_xywh: tuple[int, int, int, int]
    area: int
    rle: RunLengthMask

    @property
    def segmentation(self) -> np.ndarray:
        """The mask, ``ndarray (H, W)`` of bool (decoded on each access)."""
        return self.rle.decode()

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return self.rle.shape_hw


@dataclass(frozen=True, eq=False)
class TextSegmentation:
    """What :func:`segment_text` found.

    Attributes
    ----------
    objects : tuple of TextMatch
        Selected objects, by descending score; ``objects[i].label == i + 1``.
    labels : ndarray of shape (H, W), uint32
        The objects painted largest first (a smaller object on a larger one
        stays visible); 0 is background.
    texts : tuple of str
        The queried texts; ``text_index`` refers to them.
    scores : ndarray of shape (N, T), float32
        Score of every candidate for every text; NaN for candidates excluded
        by ``points_xy`` / ``boxes_xyxy``.
    candidates : tuple
        The candidates scored (MaskRecords, or the masks passed in).
    """

    objects: tuple[TextMatch, ...]
    labels: np.ndarray
    texts: tuple[str, ...]
    scores: np.ndarray
    candidates: tuple[Any, ...]

    def class_labels(self) -> np.ndarray:
        """``ndarray (H, W)`` of uint16: ``text_index + 1`` per pixel, 0 for background."""
        lut = np.zeros(len(self.objects) + 1, dtype=np.uint16)
        lut[1:] = [o.text_index + 1 for o in self.objects]
        return lut[self.labels]

    def for_text(self, text: str) -> tuple[TextMatch, ...]:
        """The objects of one text, best first."""
        if text not in self.texts:
            raise ValueError(f"text must be one of {self.texts}, got {text!r}")
        return tuple(o for o in self.objects if o.text == text)


# --------------------------------------------------------------------------- #
# The entry point
# --------------------------------------------------------------------------- #
def _pixels_and_embedding(
    image_or_embedding: np.ndarray | ImageEmbedding,
    image: np.ndarray | None,
    rgb: bool | None,
    contrast_limits: Sequence[float] | None,
) -> tuple[np.ndarray, ImageEmbedding | None]:
    """The RGB uint8 image CLIP crops from, and the embedding if one was given."""
    if isinstance(image_or_embedding, ImageEmbedding):
        if image is None:
            raise ValueError(
                "image: CLIP needs the pixels, so pass image=... together with an "
                "ImageEmbedding (or pass the image itself instead of the embedding)"
            )
        pixels = prepare_image(image, rgb=rgb, contrast_limits=contrast_limits)
        if pixels.shape[:2] != image_or_embedding.original_hw:
            raise ValueError(
                f"image has shape {pixels.shape[:2]} but the embedding was made for an image "
                f"of shape {image_or_embedding.original_hw}"
            )
        return pixels, image_or_embedding
    if image is not None:
        raise ValueError("image: give the image once (as image_or_embedding), not twice")
    return prepare_image(image_or_embedding, rgb=rgb, contrast_limits=contrast_limits), None


def _matches(
    cands: list[Candidate],
    rows: np.ndarray,
    scores: Scores,
    chosen: list[tuple[int, int]],
    texts: tuple[str, ...],
) -> tuple[TextMatch, ...]:
    out = []
    for label, (row, t) in enumerate(chosen, start=1):
        cand = cands[int(rows[row])]
        out.append(
            TextMatch(
                label=label,
                text=texts[t],
                text_index=t,
                score=float(scores.score[row, t]),
                relative_score=float(scores.relative[row, t]),
                similarity=float(scores.similarity[row, t]),
                candidate_index=int(rows[row]),
                bbox_xywh=cand.bbox_xywh,
                area=cand.area,
                rle=cand.as_rle(),
            )
        )
    return tuple(out)


def segment_text(
    model: Sam | None,
    clip: ClipEncoder,
    image_or_embedding: np.ndarray | ImageEmbedding,
    text: str | Sequence[str],
    *,
    image: np.ndarray | None = None,
    candidates: Sequence[MaskRecord] | Sequence[np.ndarray] | np.ndarray | None = None,
    points_xy: Any = None,
    boxes_xyxy: Any = None,
    top_k: int | None = None,
    threshold: float = 0.5,
    negative_texts: Sequence[str] = DEFAULT_NEGATIVE_TEXTS,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    crop: CropSettings | None = None,
    automatic: AutomaticSettings | None = None,
    mask_cache: AutomaticMaskCache | None = None,
    batch_size: int = 32,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> TextSegmentation:
    """Segment the objects of a 2D image that one or several texts describe.

    Parameters
    ----------
    model : Sam or None
        Proposes the candidates (None only when ``candidates`` are given).
    clip : ClipModel
        From :func:`load_clip` (or anything with the :class:`ClipEncoder` interface).
    image_or_embedding : ndarray of shape (H, W), (H, W, 3) or (H, W, 4), or ImageEmbedding
        The image (any dtype, see :func:`napari_sam.image.prepare_image`), or
        its SAM embedding, reused for the automatic masks; then pass ``image``.
    text : str or sequence of str
        ``"nucleus"``, or ``["nucleus", "mitotic cell"]``: one class per text.
    image : ndarray, optional
        The pixels, required with an ImageEmbedding (CLIP looks at crops).
    candidates : sequence of MaskRecord or of bool masks (H, W), or ndarray (N, H, W), optional
        Default: automatic masks of the image with ``automatic`` settings.
    points_xy : array-like of shape (P, 2), optional
        Keep only candidates containing one of these ``(x, y)`` pixels.
    boxes_xyxy : array-like of shape (B, 4), optional
        Keep only candidates with 90 % of their area inside one of these boxes
        (with points too: a candidate passing either test is kept). Text +
        box + ``top_k=1``: the best-matching object inside the box.
    top_k : int, optional
        At most this many objects per text (the best ones).
    threshold : float
        Minimum score (probability against ``negative_texts``); 0.5 with one
        negative text means "more like the text than like the negative".
    negative_texts : sequence of str
        What an object should not be; at least one.
    templates : sequence of str
        Prompt templates with one ``{}``; the text embedding is their mean.
    crop : CropSettings, optional
        Margin and outside suppression (default ``CropSettings()``: grey).
    automatic : AutomaticSettings, optional
        Settings of the automatic candidates (default ``AutomaticSettings()``).
    mask_cache : AutomaticMaskCache, optional
        Reuse automatic masks across calls on the same image.
    batch_size : int
        Crops embedded together.
    rgb, contrast_limits
        How to read the image (see :func:`napari_sam.image.prepare_image`).
    progress : callable ``(done, total) -> None``, optional
        The automatic run's steps first (if one runs), then one step for the
        texts and one per batch of crops; ``total`` grows once, when the
        candidates are known.
    cancel : callable ``() -> bool``, optional
        Polled between steps.

    Returns
    -------
    TextSegmentation

    Raises
    ------
    Cancelled
        If ``cancel()`` returned True.
    ValueError
        For invalid texts, templates, thresholds, prompts or candidates.
    """
    texts = text_list("text", text, allow_empty=False)
    negatives = text_list("negative_texts", negative_texts, allow_empty=False)
    if set(texts) & set(negatives):
        raise ValueError(f"text and negative_texts share {sorted(set(texts) & set(negatives))}")
    templates = check_templates(templates)
    check_selection(threshold, top_k, batch_size)
    points = prompt_array("points_xy", points_xy, 2)
    boxes = prompt_array("boxes_xyxy", boxes_xyxy, 4)
    pixels, embedding = _pixels_and_embedding(image_or_embedding, image, rgb, contrast_limits)
    shape_hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    steps = Steps(progress, cancel)
    steps.check()
    if candidates is None:
        if model is None:
            raise ValueError("model: a SAM model is needed to propose candidates; got None")
        cache = mask_cache if mask_cache is not None else AutomaticMaskCache(1)
        candidates = cache.generate(
            model,
            pixels,
            automatic or AutomaticSettings(),
            embedding=embedding,
            progress=steps.forward,
            cancel=cancel,
        )
    cands = as_candidates(candidates, shape_hw)
    rows = allowed_candidates(cands, points, boxes)
    steps.extend(1 + -(-len(rows) // batch_size))
    text_features = embed_texts(clip, texts + negatives, templates)
    steps.step()
    kept = [cands[i] for i in rows]
    if kept:
        crop = crop or CropSettings()
        image_features = embed_candidates(clip, pixels, kept, crop, batch_size, steps.step)
    else:
        image_features = torch.zeros((0, text_features.shape[1]))
    scores = score_candidates(
        image_features, text_features[: len(texts)], text_features[len(texts) :], clip.logit_scale
    )
    objects = _matches(cands, rows, scores, select(scores.score, threshold, top_k), texts)
    all_scores = np.full((len(cands), len(texts)), np.nan, dtype=np.float32)
    all_scores[rows] = scores.score
    return TextSegmentation(
        objects=objects,
        labels=records_to_labels(objects, shape_hw=shape_hw, dtype=np.uint32),
        texts=texts,
        scores=all_scores,
        candidates=tuple(c.source for c in cands),
    )
