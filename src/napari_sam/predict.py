"""Encode an image once, then predict masks from prompts, with no hidden state.

``encode_image`` runs the image encoder and returns an :class:`ImageEmbedding`
that remembers what produced it; ``predict_masks`` turns point and box prompts
(in the ORIGINAL image's pixel coordinates) into a :class:`MaskPrediction`.
:class:`Predictor` wraps both for people used to ``segment_anything``.

Prompts (points, labels, boxes, mask logits) follow the conventions of
:mod:`napari_sam.prompts`: original-image pixels, one object per box, labels
1 / 0 / -1 (padding), points off the image refused.

Precision (see :mod:`napari_sam.precision`): :func:`encode_image` takes
``precision`` (default ``"exact"``, float32 with the reference's results;
``"auto"`` is bfloat16 where the hardware makes it fast) and the embedding
keeps its dtype (half precision halves its memory); decoding follows the
embedding's precision unless told otherwise. :class:`Predictor` defaults to
``"auto"``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from ._results import ImageEmbedding, LowResPrediction, MaskPrediction
from .allocator import tuned_allocator
from .image import (
    boxes_to_input_frame,
    input_shape_hw,
    points_to_input_frame,
    prepare_image,
    to_model_input,
)
from .models._shared_image import SharedImageWork, broadcast_source
from .models.common import call_before_layers
from .precision import (
    cached_for,
    cast_module,
    compiled_module,
    inference_module,
    resolve_precision,
)
from .prompts import validate_prompts

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .models.sam import Sam


# --------------------------------------------------------------------------- #
# Torch-level functions (reused by automatic.py)
# --------------------------------------------------------------------------- #
# Per-image products of the factored mask decoder (models/_shared_image.py),
# for the most recently decoded embeddings: eleven image embeddings' worth of
# memory each (ViT-B: 44 MiB in fp32), so only a couple are kept (a session's
# other cached embeddings pay them again, once, on their next click).
_IMAGE_WORK_SLOTS = 2
_IMAGE_WORK: OrderedDict[tuple[int, torch.dtype], tuple[weakref.ref, SharedImageWork]] = (
    OrderedDict()
)
_IMAGE_WORK_LOCK = threading.Lock()


def _image_work(features: torch.Tensor, dtype: torch.dtype) -> SharedImageWork:
    """The decoder's shared products for ``features`` decoded in ``dtype`` (LRU of a few)."""
    key = (id(features), dtype)
    with _IMAGE_WORK_LOCK:
        hit = _IMAGE_WORK.get(key)
        if hit is not None and hit[0]() is features:
            _IMAGE_WORK.move_to_end(key)
            return hit[1]
        work = SharedImageWork()
        _IMAGE_WORK[key] = (weakref.ref(features), work)
        while len(_IMAGE_WORK) > _IMAGE_WORK_SLOTS:
            _IMAGE_WORK.popitem(last=False)
        return work


def encode_image(
    model: Sam,
    image: np.ndarray,
    *,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
    precision: str = "exact",
    compile: bool = False,
    between_layers: Callable[[], None] | None = None,
) -> ImageEmbedding:
    """Run the image encoder on one 2D image.

    Parameters
    ----------
    model : Sam
        The model (eval mode).
    image : array-like of shape (H, W), (H, W, 3) or (H, W, 4)
        Any real dtype; see :func:`napari_sam.image.prepare_image`.
    rgb : bool, optional
        Whether the last axis is colour; guessed when ``None``.
    contrast_limits : (float, float), optional
        napari's display range, mapped to 0..255.
    precision : {"exact", "auto", "fp32", "bf16", "fp16"}, optional
        Numeric precision of the encoder (:mod:`napari_sam.precision`).
        Default ``"exact"`` (float32, the reference's results); ``"auto"`` is
        bfloat16 where the hardware makes it fast, else float32.
    compile : bool, optional
        Run the encoder through ``torch.compile`` (cached per model and
        precision). Off by default: the first call then takes tens of seconds
        and needs a C++ compiler; it pays from a few dozen images on.
    between_layers : callable, optional
        Called without arguments, in this thread, before each layer of the
        encoder runs (89 calls for ViT-B; in bf16 on a 2-core Xeon with AMX
        the longest gap between two is a global attention, about 134 ms,
        the others 25 ms or less). It may block, to let more urgent work have the CPU, or
        raise, to abandon the encoding (the exception propagates). Used by
        napari's background pre-encoding of the next slice. Not with ``compile``.

    Returns
    -------
    ImageEmbedding
        ``features`` in the dtype of the chosen precision.

    Raises
    ------
    ValueError
        If ``between_layers`` is combined with ``compile``.
    """
    if compile and between_layers is not None:
        raise ValueError("between_layers cannot be combined with compile=True (pick one)")
    dtype = resolve_precision(precision, model.device)
    if compile:
        encoder = compiled_module(model.image_encoder, dtype)
    else:  # bf16 on CPUs with AMX: linears pre-packed for oneDNN (ViT-B about 7 % faster)
        encoder = inference_module(model.image_encoder, dtype, rows_hint=_encoder_tokens(model))
    rgb_image = prepare_image(image, rgb=rgb, contrast_limits=contrast_limits)
    original_hw = (int(rgb_image.shape[0]), int(rgb_image.shape[1]))
    x = to_model_input(
        rgb_image, img_size=model.img_size, pixel_mean=model.pixel_mean, pixel_std=model.pixel_std
    )
    hooks = (
        contextlib.nullcontext()
        if between_layers is None
        else call_before_layers(encoder, between_layers)
    )
    with torch.inference_mode(), tuned_allocator(), hooks:
        features = encoder(x.to(dtype))
    return ImageEmbedding(
        features=features,
        original_hw=original_hw,
        input_hw=input_shape_hw(original_hw, model.img_size),
        img_size=model.img_size,
        model_name=model.config.name,
        dtype=str(features.dtype).removeprefix("torch."),
    )


def _encoder_tokens(model: Sam) -> int:
    """Tokens the encoder's linear layers see per image (the patch grid of a ViT)."""
    grid = getattr(model.image_encoder, "grid_hw", None)
    return int(grid[0] * grid[1]) if grid is not None else 4096


def check_embedding(model: Sam, embedding: ImageEmbedding) -> None:
    """Raise ValueError if ``embedding`` was not produced by a model like ``model``.

    Compares the model name, input size and embedding shape (weights are not
    compared: two checkpoints of one architecture are indistinguishable here).
    """
    config = model.config
    got = (embedding.model_name, embedding.img_size, tuple(embedding.features.shape[1:]))
    expected = (config.name, model.img_size, (config.prompt_embed_dim, *config.embedding_hw))
    if got != expected:
        raise ValueError(
            "embedding was produced by a different model: embedding has "
            f"(model_name, img_size, features C x h x w) = {got}, model has {expected}; "
            "run encode_image with this model"
        )


def decode_low_res(
    model: Sam,
    embedding: ImageEmbedding,
    *,
    points_xy: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes_xyxy: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
    precision: str | None = None,
    iou_above: float | None = None,
) -> LowResPrediction:
    """Run the prompt encoder and mask decoder for a batch of B objects.

    Parameters
    ----------
    model : Sam
    embedding : ImageEmbedding
        From :func:`encode_image` with this model.
    points_xy : Tensor of shape (B, N, 2), float, optional
        Original-frame ``(x, y)``; requires ``point_labels``.
    point_labels : Tensor of shape (B, N), int, optional
        1 foreground, 0 background, -1 padding.
    boxes_xyxy : Tensor of shape (B, 4), float, optional
        Original-frame ``(x0, y0, x1, y1)``.
    mask_input : Tensor of shape (B, 1, 4h, 4w), float, optional
        Low-res logits from a previous prediction.
    multimask : bool
        Three candidates per object (True) or one (False).
    precision : {"exact", "auto", "fp32", "bf16", "fp16"}, optional
        Precision of the mask decoder; default: that of the embedding.
    iou_above : float, optional
        Compute logits only for the objects with a predicted IoU above this
        (the others' upscaling is skipped; the result's ``index`` lists the
        kept objects). Their logits equal those of a call without it.

    Returns
    -------
    LowResPrediction
        ``logits`` (B, M, 4h, 4w) and ``iou_scores`` (B, M), M = 3 or 1,
        float32 whatever the precision.
    """
    check_embedding(model, embedding)
    _check_batch_shapes(points_xy, point_labels, boxes_xyxy, mask_input, embedding.mask_input_hw)
    device = model.device
    points = None
    if points_xy is not None:
        coords = points_to_input_frame(
            points_xy.to(device, torch.float32), embedding.original_hw, embedding.input_hw
        )
        points = (coords, point_labels.to(device, torch.int))
    boxes = None
    if boxes_xyxy is not None:
        boxes = boxes_to_input_frame(
            boxes_xyxy.to(device, torch.float32), embedding.original_hw, embedding.input_hw
        )
    features = embedding.features
    dtype = features.dtype if precision is None else resolve_precision(precision, device)
    decoder = cast_module(model.mask_decoder, dtype)
    # A mask prompt makes the image side new on every call: nothing to reuse.
    work = _image_work(features, dtype) if mask_input is None else None
    features = features.to(device, dtype)
    if mask_input is not None:
        mask_input = mask_input.to(device, torch.float32)
    prompt_encoder = model.prompt_encoder
    with torch.inference_mode(), tuned_allocator(release=False):
        # The prompt encoder is tiny and stays float32; its outputs are cast.
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        image_pe = cached_for(  # channels last: its tokens are contiguous
            prompt_encoder,
            ("dense_pe", dtype),
            lambda: prompt_encoder.get_dense_pe().to(dtype, memory_format=torch.channels_last),
        )
        args = (features, image_pe, sparse.to(dtype), _cast_broadcast(dense, dtype), multimask)
        if hasattr(decoder, "forward_selected"):
            logits, iou_scores, index = decoder.forward_selected(
                *args, iou_above=iou_above, image_work=work
            )
        else:  # a decoder with only the reference's signature: select afterwards
            logits, iou_scores = decoder(*args)
            index = None
            if iou_above is not None:
                index = torch.nonzero((iou_scores > iou_above).any(dim=1)).flatten()
                logits = logits[index]
    return LowResPrediction(logits.float(), iou_scores.float(), index)


def _cast_broadcast(dense: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast ``B x C x h x w`` to ``dtype``, keeping broadcast axes (stride 0) broadcast.

    The dense embedding of "no mask" is one vector broadcast over the batch and
    the image; cast as it lies it would fill ``C x h x w`` values per call.
    """
    if dense.dtype == dtype:
        return dense
    return broadcast_source(dense).to(dtype).expand_as(dense)


def _check_batch_shapes(
    points_xy: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes_xyxy: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    mask_hw: tuple[int, int],
) -> None:
    """Shape checks of :func:`decode_low_res` (its inputs are already batched)."""
    if (points_xy is None) != (point_labels is None):
        raise ValueError("points_xy and point_labels must be given together")
    h4, w4 = mask_hw
    given = {
        name: (tensor, pattern, tail)
        for name, tensor, pattern, tail in (
            ("points_xy", points_xy, "(B, N, 2)", (None, 2)),
            ("point_labels", point_labels, "(B, N)", (None,)),
            ("boxes_xyxy", boxes_xyxy, "(B, 4)", (4,)),
            ("mask_input", mask_input, f"(B, 1, {h4}, {w4})", (1, h4, w4)),
        )
        if tensor is not None
    }
    for name, (tensor, pattern, tail) in given.items():
        shape = tuple(tensor.shape)
        ok = len(shape) == 1 + len(tail) and all(
            t in (None, s) for t, s in zip(tail, shape[1:], strict=True)
        )
        if not ok:
            raise ValueError(f"{name} must have shape {pattern}; received {shape}")
    if points_xy is not None and point_labels.shape != points_xy.shape[:2]:
        raise ValueError(
            f"point_labels must have shape {tuple(points_xy.shape[:2])} (B, N of points_xy); "
            f"received {tuple(point_labels.shape)}"
        )
    sizes = {name: tensor.shape[0] for name, (tensor, _, _) in given.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes (first axis) must agree; received {sizes}")


def upscale_logits(low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
    """Upscale low-res logits to the original image (the reference's postprocess).

    Parameters
    ----------
    low_res_logits : Tensor of shape (B, M, 4h, 4w)
    embedding : ImageEmbedding
        Gives ``img_size``, ``input_hw`` and ``original_hw``.

    Returns
    -------
    Tensor of shape (B, M, H, W), float32
        Bilinear (``align_corners=False``) to ``img_size``, cropped to
        ``input_hw``, bilinear to ``original_hw`` (skipped when that is
        ``input_hw``: a same-size bilinear resize is the identity).
    """
    size = embedding.img_size
    h, w = embedding.input_hw
    with torch.inference_mode():
        x = F.interpolate(
            low_res_logits.float(), (size, size), mode="bilinear", align_corners=False
        )
        x = x[..., :h, :w]
        if embedding.original_hw == (h, w):
            return x
        return F.interpolate(x, embedding.original_hw, mode="bilinear", align_corners=False)


# Above one mixed-sign quad in this many, upscaling everything is cheaper.
_MIXED_SHARE = 8
# Upscaling factor -> (integer dtype of that many bytes, all bytes 1).
_WORDS = {
    2: (torch.int16, 0x0101),
    4: (torch.int32, 0x01010101),
    8: (torch.int64, 0x0101010101010101),
}


def upscale_to_masks(
    low_res_logits: torch.Tensor, embedding: ImageEmbedding, threshold: float = 0.0
) -> torch.Tensor:
    """``upscale_logits(low_res_logits, embedding) > threshold``, without most of the work.

    With a threshold of 0 and no second resize (the original image is the
    resized input: longest side ``img_size``), every full-resolution pixel
    is a convex combination of the four low-res logits around it, so where
    those four agree in sign (all above 0, or none) so does the pixel. Only
    the f x f pixel blocks of low-res quads with mixed signs, along the mask
    boundaries, are interpolated, with the bilinear weights of the f-times
    upscaling (f = 4 for SAM, 2 for the demo model; 2, 4 or 8 supported).
    Equal to thresholding the upscaled logits up to float rounding of values
    within about 1e-7 of 0 on those boundaries. Ragged masks (more than one
    quad in eight mixed: the noise of random weights) are upscaled along
    the rows and decided row by row (:func:`_upscaled_signs`); any other case
    takes the plain path.

    Parameters
    ----------
    low_res_logits : Tensor of shape (B, M, L, L)
    embedding : ImageEmbedding
    threshold : float, optional

    Returns
    -------
    Tensor of shape (B, M, H, W), bool
        Possibly a strided view (of a slightly larger buffer).
    """
    low = low_res_logits.float()
    size, (h, w) = embedding.img_size, embedding.input_hw
    side = low.shape[-1]
    f = size // side  # the upscaling factor (4 for SAM, 2 for the demo model)
    word = _WORDS.get(f)
    plain = threshold != 0 or embedding.original_hw != (h, w) or low.shape[-2] != side
    if plain or word is None or f * side != size:
        return upscale_logits(low, embedding) > threshold
    with torch.inference_mode():
        # Quads between low-res rows/columns r and r + 1, for r = -1 .. L - 1 (edge
        # replicated, as the upscaling clamps there): Q x Q per mask, Q = L + 1.
        padded = F.pad(low.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        above = padded > 0
        corners = (above[:, :-1, :-1], above[:, :-1, 1:], above[:, 1:, :-1], above[:, 1:, 1:])
        all_above = corners[0] & corners[1] & corners[2] & corners[3]
        mixed = (corners[0] | corners[1] | corners[2] | corners[3]) & ~all_above
        if int(mixed.sum()) > mixed.numel() // _MIXED_SHARE:  # ragged masks (noise)
            return _upscaled_signs(low.flatten(0, 1), f, h, w).unflatten(0, low.shape[:2])
        n, q = all_above.shape[:2]
        # Each quad covers f x f output pixels (quad r starts at output row f r - f / 2).
        # Written as words of f bytes, one word a quad row: 0 or 0x0101...
        dtype, ones = word
        words = (all_above.to(dtype) * ones)[:, :, None, :]
        words = words.expand(n, q, f, q).reshape(n, f * q, q)
        where = torch.nonzero(mixed)  # K x 3: (mask, quad row, quad column)
        if len(where):
            m, r, c = where.unbind(1)
            v00, v01 = padded[m, r, c], padded[m, r, c + 1]
            v10, v11 = padded[m, r + 1, c], padded[m, r + 1, c + 1]
            t = torch.arange(f, device=low.device)
            a = (t + 0.5) / f  # the bilinear weight of the later row / column
            top = v00[:, None] * (1 - a) + v01[:, None] * a  # K x f (columns)
            bottom = v10[:, None] * (1 - a) + v11[:, None] * a
            values = top[:, None, :] * (1 - a)[:, None] + bottom[:, None, :] * a[:, None]
            packed = (values > 0).to(torch.uint8).view(dtype)[..., 0]  # K x f words
            flat = ((m * f * q + f * r)[:, None] + t) * q + c[:, None]  # K x f
            words.view(-1)[flat.flatten()] = packed.flatten()
        masks = words.view(torch.bool).view(*low.shape[:2], f * q, f * q)
    return masks[..., f // 2 : f // 2 + h, f // 2 : f // 2 + w]


def _upscaled_signs(low: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """``upscaled > 0`` for the f-times bilinear upscaling of ``low``, cropped to ``h x w``.

    Upscales the rows (1-D ``F.interpolate``), then decides every output row
    of a low-res row group by one comparison with its middle row: row
    ``f i + k`` is ``(1 - a) r_{i-1} + a r_i`` (or ``(1 - a) r_i + a r_{i+1}``)
    with ``0 < a < 1``, positive exactly when ``r_i > c r_{i-1}`` (or
    ``r_i > c r_{i+1}``), ``c = -(1 - a) / a``; rows ``k`` and ``f - 1 - k``
    share ``c``. So half as many scalings as rows in a group, and bool outputs
    written straight, instead of ``f x f`` float interpolations and a
    threshold pass. Equal to thresholding the upscaled logits up to float
    rounding of values within about 1e-7 of 0.

    Parameters
    ----------
    low : Tensor of shape (N, L, L), float32
    f : int
        Even upscaling factor.
    h, w : int
        Crop of the ``f L x f L`` result (at most ``f L``).

    Returns
    -------
    Tensor of shape (N, h, w), bool
    """
    n, side = low.shape[:2]
    groups = -(-h // f)  # low-res row groups that reach the crop
    rows_in = low[:, : groups + 1].reshape(-1, 1, side)  # 1-D: far faster than a 2-D resize
    wide = F.interpolate(rows_in, size=f * side, mode="linear", align_corners=False)
    wide = wide.view(n, -1, f * side)[..., :w]
    edges = [wide[:, :1], wide] + ([wide[:, -1:]] if groups == side else [])
    rows = torch.cat(edges, dim=1)  # low-res rows -1 .. groups, edges replicated
    middle = rows[:, 1 : groups + 1]
    out = torch.empty(n, groups, f, w, dtype=torch.bool, device=low.device)
    for k in range(f // 2):
        a = (k + 0.5) / f + 0.5  # weight of the middle row in output rows k and f - 1 - k
        scaled = rows * (-(1 - a) / a)
        torch.gt(middle, scaled[:, :groups], out=out[:, :, k])
        torch.gt(middle, scaled[:, 2 : groups + 2], out=out[:, :, f - 1 - k])
    return out.view(n, groups * f, w)[:, :h]


# --------------------------------------------------------------------------- #
# numpy-level API
# --------------------------------------------------------------------------- #
def predict_masks(
    model: Sam,
    embedding: ImageEmbedding,
    *,
    points_xy: Any = None,
    point_labels: Any = None,
    boxes_xyxy: Any = None,
    mask_input: Any = None,
    multimask: bool = True,
    precision: str | None = None,
) -> MaskPrediction:
    """Predict masks for one or several objects from point, box and mask prompts.

    Parameters
    ----------
    model : Sam
    embedding : ImageEmbedding
        From :func:`encode_image` with this model.
    points_xy : array-like of shape (N, 2) or (B, N, 2), optional
        ``(x, y)`` in original pixels. ``(N, 2)`` applies to every object.
    point_labels : array-like of shape (N,) or (B, N), optional
        1 foreground, 0 background, -1 padding (ignored).
    boxes_xyxy : array-like of shape (4,) or (B, 4), optional
        ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``; one object per box.
    mask_input : array-like of shape (4h, 4w), (B or 1, 4h, 4w) or (B or 1, 1, 4h, 4w)
        Low-res logits of a previous prediction, one mask per object.
    multimask : bool
        Return three candidates per object (default) or one.
    precision : {"exact", "auto", "fp32", "bf16", "fp16"}, optional
        Precision of the mask decoder; default: that of the embedding.

    Returns
    -------
    MaskPrediction
        B = number of objects (boxes, per-object point sets or masks; 1 otherwise).

    Raises
    ------
    ValueError
        Naming the argument: labels without points (or the reverse), shapes
        or batch sizes that disagree, labels outside {-1, 0, 1}, NaN or
        infinite values, a box with ``x1 < x0`` or ``y1 < y0``, a point off
        the image, a box that misses the image, no prompt at all, or an
        embedding from another model.
    """
    check_embedding(model, embedding)
    prompts = validate_prompts(
        points_xy=points_xy,
        point_labels=point_labels,
        boxes_xyxy=boxes_xyxy,
        mask_input=mask_input,
        shape_hw=embedding.original_hw,
        mask_input_hw=embedding.mask_input_hw,
    )

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    low = decode_low_res(
        model,
        embedding,
        points_xy=tensor(prompts.points_xy),
        point_labels=tensor(prompts.point_labels),
        boxes_xyxy=tensor(prompts.boxes_xyxy),
        mask_input=tensor(prompts.mask_input),
        multimask=multimask,
        precision=precision,
    )
    masks = upscale_to_masks(low.logits, embedding, model.mask_threshold)
    return MaskPrediction(
        masks=masks.cpu().numpy(),
        iou_scores=low.iou_scores.cpu().numpy(),
        low_res_logits=low.logits.cpu().numpy(),
    )


# --------------------------------------------------------------------------- #
# segment_anything-style convenience
# --------------------------------------------------------------------------- #
class Predictor:
    """Stateful wrapper for people coming from ``segment_anything.SamPredictor``.

    Parameters
    ----------
    model : Sam
    precision : {"auto", "exact", "fp32", "bf16", "fp16"}, optional
        Precision of :meth:`set_image` (the decoder follows the embedding).
        Default ``"auto"``: bfloat16 where the hardware makes it fast, else
        float32; ``"exact"`` for the reference's results.
    compile : bool, optional
        ``torch.compile`` the encoder (see :func:`encode_image`). Default False.

    Examples
    --------
    >>> predictor = Predictor(model)  # doctest: +SKIP
    >>> predictor.set_image(image)  # doctest: +SKIP
    >>> pred = predictor.predict(points_xy=[[120, 80]], point_labels=[1])  # doctest: +SKIP
    >>> mask = pred.best().masks[0, 0]  # doctest: +SKIP
    """

    def __init__(self, model: Sam, *, precision: str = "auto", compile: bool = False) -> None:
        resolve_precision(precision, model.device)  # validate now, not at set_image
        self.model = model
        self.precision = precision
        self.compile = compile
        self._embedding: ImageEmbedding | None = None

    def set_image(
        self,
        image: np.ndarray,
        *,
        rgb: bool | None = None,
        contrast_limits: Sequence[float] | None = None,
    ) -> ImageEmbedding:
        """Encode ``image`` (see :func:`encode_image`) and keep its embedding."""
        self._embedding = encode_image(
            self.model,
            image,
            rgb=rgb,
            contrast_limits=contrast_limits,
            precision=self.precision,
            compile=self.compile,
        )
        return self._embedding

    def reset_image(self) -> None:
        """Forget the current image."""
        self._embedding = None

    @property
    def embedding(self) -> ImageEmbedding:
        """The current image's embedding; RuntimeError before :meth:`set_image`."""
        if self._embedding is None:
            raise RuntimeError("no image set: call Predictor.set_image(image) before predict")
        return self._embedding

    def predict(
        self,
        points_xy: Any = None,
        point_labels: Any = None,
        boxes_xyxy: Any = None,
        mask_input: Any = None,
        multimask: bool = True,
    ) -> MaskPrediction:
        """Predict masks for the current image (see :func:`predict_masks`)."""
        return predict_masks(
            self.model,
            self.embedding,
            points_xy=points_xy,
            point_labels=point_labels,
            boxes_xyxy=boxes_xyxy,
            mask_input=mask_input,
            multimask=multimask,
        )


__all__ = [
    "ImageEmbedding",
    "LowResPrediction",
    "MaskPrediction",
    "Predictor",
    "check_embedding",
    "decode_low_res",
    "encode_image",
    "predict_masks",
    "upscale_logits",
    "upscale_to_masks",
]
