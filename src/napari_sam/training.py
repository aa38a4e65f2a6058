"""Fine-tune a SAM-family model on curated labels with SAM's interactive recipe.

For each object of an image a first prompt is drawn (a positive point, a
jittered box, or a set of positive and negative points); then a few rounds
of corrective clicks follow, each sampled from the error region of the
previous prediction, whose low-res logits are fed back as the mask prompt.
The loss is BCE + dice (weights configurable; SAM's focal:dice 20:1 is
available but collapses to empty masks when training from scratch) on the
best of the multimask outputs, plus the MSE of the IoU head against the real
IoU. With the image encoder frozen (``train_encoder=False``, the usual way to
fine-tune real SAM weights) embeddings are computed once per image and
cached. Checkpoints use the official SAM state-dict layout and are written
atomically.

Interactive evaluation lives in :mod:`napari_sam.evaluation`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._interactive import LossWeights, Prepared, image_loss, prepare_pairs

if TYPE_CHECKING:
    import numpy as np

    from .evaluation import Evaluation
    from .models.sam import Sam


@dataclass(frozen=True)
class Recipe:
    """Knobs of the interactive training recipe.

    Attributes
    ----------
    objects_per_image : int
        Objects prompted per image and step (fewer if the image has fewer).
    click_rounds : int
        Corrective-click rounds after the first prompt.
    prompt_probs : (float, float, float)
        Probabilities of the first prompt being a point, a box or a point set.
    box_noise : float
        Standard deviation of the box jitter as a fraction of the box side.
    loss : LossWeights
    weight_decay : float
    warmup_steps : int
        Linear warm-up of the learning rate.
    decay_fraction : float
        Final fraction of the steps with a cosine decay to 0; before it the
        learning rate stays constant.
    grad_clip : float
        Gradient-norm clip (0 disables).
    augment : bool or None
        Random flips and 90-degree rotations; ``None`` means "when the encoder
        trains" (cached embeddings cannot be augmented).
    log_every : int
        Steps between history records (and the ``log`` callback).
    val_every : int
        Steps between validations (0: only at the end, if validation data).
    checkpoint_every : int
        Steps between checkpoint saves (0: only at the end).
    val_max_objects : int or None
        Objects per validation image (evenly spaced ids); None for all.
    time_budget_s : float or None
        Wall-time budget: training stops when it is spent (or after ``steps``,
        whichever comes first), and the schedule follows whichever of the
        step and time fractions is further along.
    """

    objects_per_image: int = 6
    click_rounds: int = 2
    prompt_probs: tuple[float, float, float] = (0.4, 0.4, 0.2)
    box_noise: float = 0.1
    loss: LossWeights = field(default_factory=LossWeights)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    decay_fraction: float = 0.3
    grad_clip: float = 1.0
    augment: bool | None = None
    log_every: int = 10
    val_every: int = 0
    checkpoint_every: int = 0
    val_max_objects: int | None = 16
    time_budget_s: float | None = None


@dataclass(frozen=True)
class TrainingRecord:
    """One entry of the training history.

    Attributes
    ----------
    step : int
        Steps done when recorded.
    loss : float
        Mean loss over the steps since the previous record.
    lr : float
        Learning rate of the last step.
    seconds : float
        Wall time since training started.
    validation : Evaluation or None
        Validation result at this step, if one ran.
    """

    step: int
    loss: float
    lr: float
    seconds: float
    validation: Evaluation | None = None


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    model : Sam
        The trained model (the object passed in), in eval mode.
    history : tuple of TrainingRecord
    steps_done : int
    cancelled : bool
        True when ``cancel`` stopped the run early; then no checkpoint was
        written at the end (a complete earlier one may exist).
    checkpoint_path : Path or None
        The last checkpoint written, if any.
    seconds : float
    """

    model: Sam
    history: tuple[TrainingRecord, ...]
    steps_done: int
    cancelled: bool
    checkpoint_path: Path | None
    seconds: float


def tie_decoder_attention_(model: Sam) -> Sam:
    """Initialise the mask decoder's attention with keys projected like queries.

    For training a decoder from scratch: every attention of the two-way
    transformer gets ``k_proj.weight = q_proj.weight`` and zero q/k biases,
    so from the first step a prompt's positional encoding and the image's
    positional encoding at nearby positions give large attention logits
    (the random-Fourier encodings of close positions have a large dot
    product). With independent random projections the model first learns a
    prompt-independent "typical object" mask and stays there: in probes on
    the synthetic data (decoder only, 1.9 M-parameter ``demo`` config) no
    run left that plateau in 400 steps, while the tied start reached
    one-click IoU 0.30 at step 200. Only the initial values change; the
    weights train freely afterwards and the checkpoint layout is the
    official one.

    Parameters
    ----------
    model : Sam
        Modified in place.

    Returns
    -------
    Sam
        ``model``.
    """
    from .models.transformer import Attention

    with torch.no_grad():
        for module in model.mask_decoder.transformer.modules():
            if isinstance(module, Attention):
                module.k_proj.weight.copy_(module.q_proj.weight)
                module.q_proj.bias.zero_()
                module.k_proj.bias.zero_()
    return model


def save_checkpoint(model: Sam, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the model's weights in the official SAM layout, atomically.

    The state dict (keys ``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``) goes to a temporary file in the same folder, is
    flushed to disk and then renamed over ``path``: a reader never sees a
    half-written file, and an interrupted save leaves the old file intact.

    Parameters
    ----------
    model : Sam
    path : str or Path
    dtype : torch.dtype, optional
        Store floating-point tensors in this dtype (e.g. ``torch.float16`` to
        halve the file); loading with ``load_state_dict`` upcasts again.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous().clone()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _lr_factor(step: int, fraction: float, recipe: Recipe) -> float:
    """Warm-up, constant, then cosine decay to 0 over the last ``decay_fraction``.

    ``fraction`` is how far training is (0 to 1, by steps or by time).
    """
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    start = 1.0 - recipe.decay_fraction
    if fraction < start or recipe.decay_fraction <= 0:
        return 1.0
    t = min((fraction - start) / recipe.decay_fraction, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _embeddings(
    model: Sam,
    data: Prepared,
    idx: list[int],
    train_encoder: bool,
    cache: dict,
    augment: bool,
    gen: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings ``B x C x h x w`` and the (augmented) label images of a batch."""
    if train_encoder:
        images, labels = data.batch(idx, model, augment=augment, gen=gen)
        return model.image_encoder(images), labels
    missing = [i for i in idx if i not in cache]
    if missing:
        images, _ = data.batch(missing, model, augment=False, gen=gen)
        with torch.no_grad():
            feats = model.image_encoder(images)
        cache.update(zip(missing, feats, strict=True))
    return torch.stack([cache[i] for i in idx]), [data.labels[i] for i in idx]


def _check_args(steps: int, batch_size: int, lr: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


def _is_cancelled(cancel: Callable[[], bool] | object | None) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def finetune(
    model: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    train_encoder: bool = False,
    steps: int = 500,
    batch_size: int = 4,
    lr: float = 1e-4,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | object | None = None,
    checkpoint_path: str | Path | None = None,
    recipe: Recipe | None = None,
    validation: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    log: Callable[[TrainingRecord], None] | None = None,
    seed: int = 0,
) -> TrainingResult:
    """Train ``model`` in place on images and their instance labels.

    Parameters
    ----------
    model : Sam
        Any model of the registry (official weights or from scratch).
    images : sequence of ndarray of shape (H, W) or (H, W, 3)
        Any dtype :func:`~napari_sam.image.prepare_image` accepts.
    labels : sequence of ndarray of shape (H, W), integer
        Instance labels (0 = background); same ``(H, W)`` as the image.
    train_encoder : bool
        Train the image encoder too. False (default) freezes it and caches
        each image's embedding: fast decoder fine-tuning.
    steps, batch_size, lr : int, int, float
        Optimiser steps, images per step, peak AdamW learning rate.
    device : str or torch.device
    progress : callable ``(done, total)``, optional
        Called after every step.
    cancel : callable returning bool, or an object with ``is_set()``, optional
        Polled before every step; when true, training stops.
    checkpoint_path : str or Path, optional
        Where to save the weights (official layout, atomically): every
        ``recipe.checkpoint_every`` steps and at the end, never after a cancel.
    recipe : Recipe, optional
    validation : (images, labels), optional
        Held-out data evaluated every ``recipe.val_every`` steps and at the end.
    log : callable ``(TrainingRecord)``, optional
        Called with every history record.
    seed : int
        Seed of batch, object and prompt sampling.

    Returns
    -------
    TrainingResult
    """
    _check_args(steps, batch_size, lr)
    recipe = recipe or Recipe()
    model.to(device)
    data = prepare_pairs(images, labels, img_size=model.img_size, device=model.device)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.image_encoder.parameters():
        p.requires_grad_(train_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    run = _Run(
        model,
        data,
        recipe,
        train_encoder,
        batch_size,
        torch.Generator().manual_seed(seed),
        torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay),
    )
    budget = recipe.time_budget_s or math.inf
    cancelled, done = False, 0
    model.train()
    try:
        while done < steps:
            fraction = max(done / steps, run.elapsed() / budget)
            if fraction >= 1.0:
                break
            if _is_cancelled(cancel):
                cancelled = True
                break
            factor = _lr_factor(done, fraction, recipe)
            loss = run.step(lr * factor, params)
            run.running += [] if loss is None else [loss]
            done += 1
            last = done == steps or run.elapsed() >= budget
            run.bookkeeping(done, lr * factor, last, validation, log, checkpoint_path)
            if progress is not None:
                progress(done, steps)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.eval()
    return TrainingResult(model, tuple(run.history), done, cancelled, run.saved, run.elapsed())


def _every(done: int, period: int) -> bool:
    return bool(period) and done % period == 0


@dataclass(eq=False)
class _Run:
    """The moving parts of one training run (batch sampling, one optimiser step)."""

    model: Sam
    data: Prepared
    recipe: Recipe
    train_encoder: bool
    batch_size: int
    gen: torch.Generator
    opt: torch.optim.Optimizer
    cache: dict = field(default_factory=dict)
    history: list[TrainingRecord] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    saved: Path | None = None
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def bookkeeping(
        self,
        done: int,
        lr: float,
        last: bool,
        validation: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None,
        log: Callable[[TrainingRecord], None] | None,
        checkpoint_path: str | Path | None,
    ) -> None:
        """After a step: validate, record the history, save a checkpoint, as due."""
        recipe = self.recipe
        val = None
        if validation is not None and (last or _every(done, recipe.val_every)):
            val = self.validate(validation)
        if self.running and (last or val is not None or _every(done, recipe.log_every)):
            loss = sum(self.running) / len(self.running)
            record = TrainingRecord(done, loss, lr, self.elapsed(), val)
            self.history.append(record)
            self.running = []
            if log is not None:
                log(record)
        if checkpoint_path is not None and (last or _every(done, recipe.checkpoint_every)):
            self.saved = save_checkpoint(self.model, checkpoint_path)

    def step(self, lr: float, params: list[torch.nn.Parameter]) -> float | None:
        """One optimiser step on a random batch; the loss, or None without objects."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        recipe = self.recipe
        augment = self.train_encoder if recipe.augment is None else recipe.augment
        idx = torch.randint(len(self.data), (self.batch_size,), generator=self.gen).tolist()
        emb, labs = _embeddings(
            self.model, self.data, idx, self.train_encoder, self.cache, augment, self.gen
        )
        losses = [
            image_loss(self.model, emb[b : b + 1], gt, recipe, self.gen)
            for b, lab in enumerate(labs)
            if (gt := self.data.pick_objects(lab, recipe.objects_per_image, self.gen)) is not None
        ]
        if not losses:
            return None
        loss = torch.stack(losses).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        self.opt.step()
        return float(loss.detach())

    def validate(self, validation: tuple[Sequence[np.ndarray], Sequence[np.ndarray]]) -> Evaluation:
        from .evaluation import evaluate

        result = evaluate(self.model, *validation, max_objects=self.recipe.val_max_objects)
        self.model.train()
        return result
