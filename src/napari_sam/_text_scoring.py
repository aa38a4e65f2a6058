"""Text prompts' arithmetic: text and crop embeddings, calibrated scores, selection.

Re-exported by :mod:`napari_sam.text`, whose module notes explain the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._text_crops import CropSettings, prepare_crops
from .automatic import Cancelled

if TYPE_CHECKING:
    from ._text_candidates import Candidate
    from .text import ClipEncoder

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


def text_list(name: str, value: str | Sequence[str], *, allow_empty: bool) -> tuple[str, ...]:
    """One text or several as a tuple of distinct, whitespace-normalised strings."""
    items = (value,) if isinstance(value, str) else tuple(value)
    cleaned = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name}: expected non-empty strings, got {item!r}")
        cleaned.append(" ".join(item.split()))
    if not cleaned and not allow_empty:
        raise ValueError(f"{name}: expected at least one text, got {value!r}")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{name}: texts must be distinct, got {cleaned}")
    return tuple(cleaned)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates as a tuple; each must hold exactly one ``{}``."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            "templates: expected at least one string with exactly one '{}' for the text, "
            f"got {bad or list(templates)}"
        )
    return templates


def check_selection(threshold: float, top_k: int | None, batch_size: int) -> None:
    """ValueError naming the first of ``threshold``, ``top_k``, ``batch_size`` out of range."""
    if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def embed_texts(clip: ClipEncoder, texts: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Template-ensembled text embeddings.

    Parameters
    ----------
    clip : ClipEncoder
    texts : sequence of str
    templates : sequence of str
        Each with one ``{}`` for the text.

    Returns
    -------
    Tensor of shape (T, D), float32
        Mean of the unit-norm embeddings of every template, re-normalised.
    """
    prompts = [template.format(text) for text in texts for template in templates]
    features = clip.encode_texts(prompts).reshape(len(texts), len(templates), -1)
    mean = features.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def embed_candidates(
    clip: ClipEncoder,
    image_rgb: np.ndarray,
    candidates: list[Candidate],
    crop: CropSettings,
    batch_size: int,
    step: Callable[[], None],
) -> torch.Tensor:
    """Unit-norm CLIP embeddings of the candidates' crops, ``(N, D)``, in batches."""
    parts = []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        pixels = prepare_crops(
            image_rgb,
            [c.segmentation() for c in chunk],
            [c.bbox_xywh for c in chunk],
            crop,
            size=clip.image_size,
            mean=clip.mean,
            std=clip.std,
        )
        features = clip.encode_images(pixels).float()
        parts.append(features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        step()
    return torch.cat(parts)


@dataclass(frozen=True)
class Scores:
    """Per candidate (rows) and text (columns): cosine, calibrated and relative scores."""

    similarity: np.ndarray
    score: np.ndarray
    relative: np.ndarray


def score_candidates(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    negative_features: torch.Tensor,
    logit_scale: float,
) -> Scores:
    """Cosine, calibrated and relative scores of N crops for T texts.

    Parameters
    ----------
    image_features : Tensor of shape (N, D), unit norm
    text_features : Tensor of shape (T, D), unit norm
    negative_features : Tensor of shape (K, D), unit norm, K >= 1
    logit_scale : float
        CLIP's temperature.

    Returns
    -------
    Scores
        ``score[n, t] = softmax(l[n, t], l[n, neg_1..K])[0]`` with
        ``l = logit_scale * cosine``; ``relative[:, t]`` = softmax over n.
    """
    sim = image_features @ text_features.T  # N x T
    logits = logit_scale * sim
    negative = torch.logsumexp(logit_scale * (image_features @ negative_features.T), dim=1)
    score = torch.sigmoid(logits - negative[:, None])  # = softmax over {t} + negatives
    relative = torch.softmax(logits, dim=0)
    return Scores(sim.numpy(), score.numpy(), relative.numpy())


def select(score: np.ndarray, threshold: float, top_k: int | None) -> list[tuple[int, int]]:
    """``(row, text)`` pairs: each row's best text if ``>= threshold``; top_k per text."""
    if score.shape[0] == 0:
        return []
    best = np.argmax(score, axis=1)
    best_score = score[np.arange(len(best)), best]
    chosen = []
    for t in range(score.shape[1]):
        rows = np.flatnonzero((best == t) & (best_score >= threshold))
        rows = rows[np.argsort(-best_score[rows], kind="stable")][:top_k]
        chosen.extend((int(r), t) for r in rows)
    chosen.sort(key=lambda rt: -best_score[rt[0]])
    return chosen


class Steps:
    """Progress over the automatic run (if any) then the text and crop batches."""

    def __init__(self, progress: ProgressCallback | None, cancel: CancelCallback | None):
        self.done = self.total = 0
        self._progress, self._cancel = progress, cancel

    def forward(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._progress is not None:
            self._progress(done, total)

    def extend(self, n: int) -> None:
        self.forward(self.done, self.total + n)

    def step(self) -> None:
        self.check()
        self.forward(self.done + 1, self.total)

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise Cancelled("text segmentation was cancelled")
