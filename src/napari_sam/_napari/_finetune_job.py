"""The Fine-tune widget's work, without Qt: training pairs from layers, one run, its names.

:func:`labelled_planes` checks an image/labels pair and finds its labelled
2D slices (the image itself when 2D; for a stack, every slice over the last
two axes with at least one object). :func:`make_request` freezes everything
a run needs, copying the pixels (through the image layer's contrast limits,
as the session's embeddings see them) and the labels: the worker never reads
a layer, and training never writes one. :func:`train_in_session` is the
worker body: it trains a deep copy of the session's model with
:func:`napari_sam.training.finetune`, so the other widgets keep using theirs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels

from napari_sam._clip import _block_triton_if_it_would_crash
from napari_sam.image import prepare_image
from napari_sam.training import Recipe, TrainingRecord, TrainingResult, finetune

from .automatic_run import stack_planes
from .layers import ViewPlane, plane_image, spatial_shape
from .models import check_model_name, finetuned_dir, model_names, resolve_device


@dataclass(frozen=True, eq=False)
class TrainingPair:
    """One 2D training example, copied out of the layers.

    Attributes
    ----------
    source : str
        Where it comes from, e.g. ``"nuclei stack[3]"``.
    image_rgb : ndarray of shape (H, W, 3), uint8
        The slice through the layer's contrast limits (what the model sees).
    labels : ndarray of shape (H, W), integer
        A copy of the labels slice (0 = background).
    """

    source: str
    image_rgb: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, eq=False)
class TrainingRequest:
    """Everything one fine-tuning run needs, fixed when the user presses Train.

    Attributes
    ----------
    train, validation : tuple of TrainingPair
        Training examples and held-out ones (possibly none).
    name : str
        Model name the result is registered under.
    checkpoint_path : Path
    steps, batch_size : int
    lr : float
    train_encoder : bool
    recipe : Recipe
    """

    train: tuple[TrainingPair, ...]
    validation: tuple[TrainingPair, ...]
    name: str
    checkpoint_path: Path
    steps: int
    batch_size: int
    lr: float
    train_encoder: bool
    recipe: Recipe


def _last_axes_plane(image: Image) -> ViewPlane:
    """The first slice over the last two spatial axes of ``image``."""
    shape = spatial_shape(image)
    ndim = len(shape)
    return ViewPlane(
        ndim=ndim,
        shape=shape,
        row_axis=ndim - 2,
        col_axis=ndim - 1,
        indices=(0,) * (ndim - 2) + (None, None),
        world_point=(),
    )


def labelled_planes(image: Image | None, labels: Labels | None) -> list[ViewPlane]:
    """The slices of ``image`` on which ``labels`` has at least one object.

    Parameters
    ----------
    image : napari.layers.Image
    labels : napari.layers.Labels
        Same spatial shape as ``image``.

    Returns
    -------
    list of ViewPlane
        Over the last two axes; one plane for a 2D image.

    Raises
    ------
    ValueError
        With a message for the user: a layer missing, shapes that differ, a
        multiscale layer, or labels without any object.
    """
    if image is None or labels is None:
        raise ValueError("Choose an image layer and the labels layer curated on it.")
    if image.multiscale or labels.multiscale:
        raise ValueError(
            f"multiscale layers are not supported ({image.name!r} / {labels.name!r}): "
            "add the full-resolution level as a plain layer"
        )
    want, got = spatial_shape(image), tuple(int(s) for s in np.shape(labels.data))
    if got != want:
        raise ValueError(
            f"labels layer {labels.name!r} has shape {got}, image {image.name!r} has shape "
            f"{want}: choose the labels curated on this image (same shape)"
        )
    planes = [p for p in stack_planes(image, _last_axes_plane(image)) if _has_objects(labels, p)]
    if not planes:
        raise ValueError(
            f"labels layer {labels.name!r} has no objects (all background): "
            "paint or commit some first"
        )
    return planes


def _has_objects(labels: Labels, plane: ViewPlane) -> bool:
    return bool(np.asarray(labels.data[plane.data_index()]).any())


def _describe(image: Image, plane: ViewPlane) -> str:
    where = ", ".join(str(i) for i in plane.indices if i is not None)
    return f"{image.name}[{where}]" if where else image.name


def collect_pairs(image: Image, labels: Labels) -> list[TrainingPair]:
    """Copies of every labelled slice of an image/labels pair.

    Parameters
    ----------
    image : napari.layers.Image
        Grayscale or RGB, 2D or a stack; its contrast limits map to 0-255.
    labels : napari.layers.Labels
        Instance labels of the same spatial shape.

    Returns
    -------
    list of TrainingPair
        One per slice of :func:`labelled_planes`, in slice order.

    Raises
    ------
    ValueError
        As :func:`labelled_planes`.
    """
    out = []
    limits = tuple(float(v) for v in image.contrast_limits)
    for plane in labelled_planes(image, labels):
        values = np.array(labels.data[plane.data_index()], copy=True)
        if not np.issubdtype(values.dtype, np.integer):
            values = values.astype(np.int64)
        pixels = plane_image(image, plane)
        rgb = prepare_image(pixels, rgb=image.rgb, contrast_limits=limits)
        out.append(TrainingPair(_describe(image, plane), rgb, values))
    return out


def parse_lr(text: str) -> float:
    """``"1e-4"`` -> 0.0001; ValueError naming the text unless it is a positive number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"learning rate must be a positive number such as 1e-4; received {text!r}")
    return value


def recipe_for(steps: int, *, validate: bool) -> Recipe:
    """SAM's recipe with a schedule and logging sized to ``steps`` (about 100 plot points)."""
    return Recipe(
        warmup_steps=min(50, steps // 10),
        log_every=max(1, steps // 100),
        val_every=max(1, steps // 10) if validate else 0,
    )


def default_name(base: str) -> str:
    """A model name not in the model list yet: ``"<base>-finetuned"``, then ``-2``, ``-3`` ..."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(base)).stem).lstrip("._-") or "sam"
    taken = set(model_names())
    name, n = f"{stem}-finetuned", 1
    while name in taken or default_checkpoint_path(name).exists():
        n += 1
        name = f"{stem}-finetuned-{n}"
    return name


def default_checkpoint_path(name: str) -> Path:
    """``<cache dir>/finetuned/<name>.pt`` (files there are offered in the model list)."""
    return finetuned_dir() / f"{name}.pt"


def make_request(
    pairs: Sequence[tuple[Image, Labels]],
    *,
    name: str,
    checkpoint_path: str | Path | None,
    steps: int,
    batch_size: int,
    lr: float,
    train_encoder: bool = False,
    hold_out: bool = False,
) -> TrainingRequest:
    """Check the inputs and copy the training data out of the layers.

    Parameters
    ----------
    pairs : sequence of (Image, Labels)
        Image layers and the labels curated on them.
    name : str
        Name of the fine-tuned model (:func:`~napari_sam._napari.models.check_model_name`),
        not in the model list yet.
    checkpoint_path : str or Path, optional
        Where to save (an existing file there is replaced); default
        :func:`default_checkpoint_path`.
    steps, batch_size, lr, train_encoder
        As in :func:`napari_sam.training.finetune`.
    hold_out : bool
        Keep the last labelled slice apart for validation (needs two or more).

    Returns
    -------
    TrainingRequest

    Raises
    ------
    ValueError
        With a message for the user.
    """
    if not pairs:
        raise ValueError("No training pairs: choose an image and its labels, then press Add pair.")
    check_model_name(name)
    if name in model_names():
        raise ValueError(
            f"a model named {name!r} is in the model list already: choose another name"
        )
    examples = [example for image, labels in pairs for example in collect_pairs(image, labels)]
    validation: list[TrainingPair] = []
    if hold_out:
        if len(examples) < 2:
            raise ValueError(
                "Holding out a slice for validation needs at least two labelled slices "
                f"or images; there is {len(examples)}: untick it or add a pair"
            )
        validation = [examples.pop()]
    path = Path(checkpoint_path).expanduser() if checkpoint_path else default_checkpoint_path(name)
    return TrainingRequest(
        train=tuple(examples),
        validation=tuple(validation),
        name=name,
        checkpoint_path=path,
        steps=int(steps),
        batch_size=int(batch_size),
        lr=float(lr),
        train_encoder=bool(train_encoder),
        recipe=recipe_for(int(steps), validate=bool(validation)),
    )


def prepare_torch() -> None:
    """Import what the optimiser needs now, in the calling (main) thread.

    ``torch.optim`` imports ``torch._dynamo``, which imports triton: with
    Mesa's libLLVM loaded (napari's OpenGL under Xvfb, a VM, remote desktop)
    that import segfaults, so triton is first marked absent there (as for
    CLIP, see :mod:`napari_sam._clip`); eager training does not need it.
    """
    _block_triton_if_it_would_crash()
    import torch._dynamo  # noqa: F401


def run_training(
    request: TrainingRequest,
    model,
    *,
    device: str,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | object | None = None,
    log: Callable[[TrainingRecord], None] | None = None,
) -> TrainingResult:
    """Fine-tune a deep copy of ``model`` on ``request`` (``model`` itself is not changed).

    Returns
    -------
    TrainingResult
        Its ``model`` is the trained copy; the checkpoint is written at the
        end, never after a cancel.
    """
    validation = None
    if request.validation:
        validation = (
            [p.image_rgb for p in request.validation],
            [p.labels for p in request.validation],
        )
    options = {
        key: getattr(request, key)
        for key in ("train_encoder", "steps", "batch_size", "lr", "checkpoint_path", "recipe")
    }
    images = [p.image_rgb for p in request.train]
    labels = [p.labels for p in request.train]
    callbacks = {"progress": progress, "cancel": cancel, "log": log}
    return finetune(
        copy.deepcopy(model),
        images,
        labels,
        device=device,
        validation=validation,
        **options,
        **callbacks,
    )


def train_in_session(request: TrainingRequest, session, **callbacks) -> TrainingResult:
    """The worker body: the session's model (loaded here if needed), copied and trained.

    ``callbacks`` are ``progress``, ``cancel`` and ``log`` of :func:`run_training`.
    """
    model = session.models.ensure()
    return run_training(request, model, device=resolve_device(session.models.device), **callbacks)


def describe_record(record: TrainingRecord, steps: int) -> str:
    """One status line, e.g. ``"Step 20 of 200: loss 0.412, validation IoU 0.71 (click)"``."""
    text = f"Step {record.step} of {steps}: loss {record.loss:.3f}"
    if record.validation is not None:
        metrics = record.validation.overall
        text += f", validation IoU {metrics.one_click_iou:.2f} (click), {metrics.box_iou:.2f} (box)"
    return text
