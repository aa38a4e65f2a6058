"""Automatic mask generation: parity with SamAutomaticMaskGenerator, callbacks, outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from napari_sam import automatic
from napari_sam._amg_candidates import Candidates, clean_small_regions
from napari_sam._rle import RunLengthMask
from napari_sam.automatic import Cancelled, MaskRecord, generate_masks
from napari_sam.labels import masks_to_labels
from napari_sam.predict import encode_image
from napari_sam.registry import build_model

from ._reference import randomize_, reference_for

SHAPE_HW = (96, 140)  # non-square, smaller than the tiny models' 128 px input on one side
THRESHOLDS_AT_ZERO = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def _amplified(model: nn.Module, factor: float = 100.0) -> nn.Module:
    """Random weights with logits large enough for the default stability filter.

    With plain random weights every logit is within +-1 of zero, so the
    stability score is 0 and the default settings keep nothing.
    """
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)
    return model


class KernelDecoder(nn.Module):
    """Test double of the mask decoder whose masks are blobs around the prompt point.

    Random decoders give masks spanning the whole image, which the crop
    layers' edge filter always removes. Here the logits are the correlation
    of the prompt's positional encoding with every pixel's (a random Fourier
    kernel, peaking at the point) plus a small image-dependent term; the
    three outputs threshold it at three levels (whole, part, subpart).
    """

    def __init__(self, prompt_encoder: nn.Module, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        gauss = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        channels = 2 * gauss.shape[1]
        self.register_buffer("gauss", gauss.detach().clone())
        self.register_buffer("positive", prompt_encoder.point_embeddings[1].weight.detach().clone())
        self.register_buffer("feature_w", torch.randn(channels, generator=gen) / channels**0.5)
        self.register_buffer("iou_w", torch.randn(channels, 3, generator=gen) * 0.3)
        self.register_buffer("levels", torch.tensor([0.45, 0.6, 0.8]))

    def _grid_pe(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        h, w = grid_hw
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
        phase = ((grid * 2 - 1) @ self.gauss) * (2 * math.pi)
        return torch.cat([phase.sin(), phase.cos()], dim=-1)  # hw x C

    def forward(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output,
    ):
        batch = sparse_prompt_embeddings.shape[0]
        h, w = image_embeddings.shape[-2:]
        point_pe = sparse_prompt_embeddings[:, 0] - self.positive  # B x C
        grid_pe = self._grid_pe((4 * h, 4 * w))  # 16hw x C
        corr = point_pe @ grid_pe.T / (grid_pe.shape[1] / 2)  # B x 16hw, 1 at the point
        feats = torch.einsum("c,chw->hw", self.feature_w, image_embeddings[0])
        feats = nn.functional.interpolate(feats[None, None], (4 * h, 4 * w), mode="bilinear")
        value = corr.view(batch, 1, 4 * h, 4 * w) + 0.05 * torch.tanh(feats)
        logits = 200.0 * (value - self.levels.view(1, 3, 1, 1))
        iou = 0.75 + 0.25 * torch.sigmoid(point_pe @ self.iou_w + feats.mean())
        if not multimask_output:
            return logits[:, :1], iou[:, :1]
        return logits, iou


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return (rng.random((*SHAPE_HW, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def amg_model():
    torch.manual_seed(0)
    return _amplified(randomize_(build_model("tiny_vit_b"), seed=0))


def _pair(name: str, seed: int = 0, *, kernel: bool = False):
    """Our model and the reference with the same weights."""
    torch.manual_seed(0)
    ours = _amplified(randomize_(build_model(name), seed=seed))
    ref = reference_for(ours)
    if kernel:
        decoder = KernelDecoder(ours.prompt_encoder, seed=seed)
        ours.mask_decoder = decoder
        ref.mask_decoder = decoder
    return ours, ref


def _reference_masks(ref, image, **kwargs):
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(ref, **kwargs).generate(image)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


_TIE = 1e-6  # predicted IoUs this close are tied: their order is rounding


def _tied_with(theirs: list[dict], i: int) -> list[int]:
    """Position ``i`` and its neighbours in the reference's order whose scores tie with it."""
    if i >= len(theirs):
        return []
    lo = hi = i
    score = [t["predicted_iou"] for t in theirs]
    while lo > 0 and abs(score[lo - 1] - score[lo]) <= _TIE:
        lo -= 1
    while hi + 1 < len(theirs) and abs(score[hi + 1] - score[hi]) <= _TIE:
        hi += 1
    return [i, *(j for j in range(lo, hi + 1) if j != i)]


def _match(ours: list[MaskRecord], theirs: list[dict], ordered: bool) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of our mask ``i`` and the reference's mask ``j``.

    In order when ``ordered``, except among masks whose predicted IoUs tie to
    rounding (``_TIE``): their order is the order of two float32 sums that
    agree to 1e-7 (ViT-B at 1024 px, two masks 6e-8 apart swapped when the
    embedding moved by 1e-6). Our mask ``i`` then pairs with the tied
    reference mask of the same point and crop. Otherwise each of our masks is
    paired with the unused reference mask of the same prompt point and crop
    with the best IoU.
    """
    if ordered:
        pairs, used = [], set()
        for i, o in enumerate(ours):
            key = (*np.round(o.point_xy, 6), *o.crop_box_xywh)
            tied = [
                j
                for j in _tied_with(theirs, i)
                if j not in used
                and (*np.round(theirs[j]["point_coords"][0], 6), *theirs[j]["crop_box"]) == key
            ]
            j = tied[0] if tied else i
            used.add(j)
            pairs.append((i, j))
        return pairs
    groups: dict[tuple, list[int]] = {}
    for j, t in enumerate(theirs):
        key = (*np.round(t["point_coords"][0], 6), *t["crop_box"])
        groups.setdefault(key, []).append(j)
    pairs = []
    for i, o in enumerate(ours):
        key = (*np.round(o.point_xy, 6), *o.crop_box_xywh)
        candidates = groups.get(key, [])
        assert candidates, f"our mask {i} has no reference mask from the same point and crop"
        mask = o.segmentation
        j = max(candidates, key=lambda j: _mask_iou(mask, theirs[j]["segmentation"]))
        candidates.remove(j)
        pairs.append((i, j))
    return pairs


def assert_same_masks(
    ours: list[MaskRecord], theirs: list[dict], *, ordered: bool = True, score_atol: float = 1e-4
):
    """Same masks (IoU >= 0.99 both ways), scores, points and crops; same order if ``ordered``.

    A stability score is a ratio of pixel counts at logit thresholds +-1, and a
    pixel whose logit lies within rounding of a threshold may fall on either
    side (which one depends on the CPU's matmul kernels: on one Xeon a 1,122 px
    mask of the demo model moved one pixel, 6.7e-4 of its score). So scores
    may differ by two pixels' worth (``2 / area``, each pixel moving a ratio
    with denominator >= area by <= 1 / area) on top of ``score_atol``.
    """
    assert len(ours) == len(theirs)
    for i, j in _match(ours, theirs, ordered):
        o, t = ours[i], theirs[j]
        iou = _mask_iou(o.segmentation, t["segmentation"])
        assert iou >= 0.99, f"our mask {i}: IoU {iou:.4f} with the reference's mask {j}"
        assert o.predicted_iou == pytest.approx(t["predicted_iou"], abs=score_atol)
        two_pixels = 2.0 / max(int(t["area"]), 1)
        assert o.stability_score == pytest.approx(
            t["stability_score"], abs=score_atol + two_pixels, nan_ok=True
        )
        assert list(o.point_xy) == pytest.approx(t["point_coords"][0], abs=1e-9)
        assert list(o.crop_box_xywh) == t["crop_box"]
        if iou == 1.0:
            assert list(o.bbox_xywh) == t["bbox"]
            assert o.area == t["area"]


@pytest.mark.parametrize(
    ("name", "kernel", "kwargs"),
    [
        ("tiny_vit_b", False, {}),
        ("tiny_vit_b", False, {"crop_n_layers": 1}),
        ("tiny_vit_b", False, THRESHOLDS_AT_ZERO),
        ("tiny_vit_b", True, {}),
        ("tiny_vit_b", True, {"crop_n_layers": 1}),
        ("tiny_vit_b", True, {"crop_n_layers": 1, **THRESHOLDS_AT_ZERO}),
        ("tiny_vit_b", True, {"crop_n_layers": 2, "crop_n_points_downscale_factor": 2}),
    ],
    ids=[
        "default",
        "crops",
        "zero",
        "kernel",
        "kernel-crops",
        "kernel-crops-zero",
        "kernel-2layers",
    ],
)
def test_parity_with_reference(image, name, kernel, kwargs):
    ours_model, ref = _pair(name, kernel=kernel)
    kwargs = {"points_per_side": 16, **kwargs}
    theirs = _reference_masks(ref, image, **kwargs)
    ours = generate_masks(ours_model, image, **kwargs)
    # Over 1000 boxes in the crop NMS, torchvision re-sorts with an unstable sort:
    # the reference's order among equal crop scores is then arbitrary.
    ordered = not (kwargs.get("crop_n_layers") and len(theirs) > 1000)
    assert_same_masks(ours, theirs, ordered=ordered)
    if kwargs.get("pred_iou_thresh") == 0.0 and not kwargs.get("crop_n_layers"):
        assert len(ours) == 3 * 16 * 16  # nothing filtered: post-processing on every mask
    if kernel and kwargs.get("crop_n_layers"):
        assert any(r.crop_box_xywh != (0, 0, SHAPE_HW[1], SHAPE_HW[0]) for r in ours)


def test_parity_default_settings_finds_masks(image, amg_model):
    """The default-settings parity above is not vacuous."""
    assert len(generate_masks(amg_model, image, points_per_side=16)) >= 1
    ours_model, _ = _pair("tiny_vit_b", kernel=True)
    assert len(generate_masks(ours_model, image, points_per_side=16)) >= 3


@pytest.mark.parametrize(
    "kwargs", [{}, {"crop_n_layers": 1}, THRESHOLDS_AT_ZERO], ids=["default", "crops", "zero"]
)
def test_parity_with_reference_on_the_trained_demo_model(demo_model, kwargs):
    """Real objects (the demo model on synthetic nuclei, a non-square crop)."""
    from napari_sam.synthetic import demo_nuclei

    sample = demo_nuclei()
    image = np.repeat(sample.image[:300, :380, None], 3, axis=2)
    ref = reference_for(demo_model)
    kwargs = {"points_per_side": 16, **kwargs}
    theirs = _reference_masks(ref, image, **kwargs)
    ours = generate_masks(demo_model, image, **kwargs)
    assert_same_masks(ours, theirs)
    if not kwargs:  # the default settings keep real objects: most match a nucleus
        truth = sample.labels[:300, :380]
        assert len(ours) >= 5
        best = [
            max(_mask_iou(r.segmentation, truth == i) for i in np.unique(truth) if i) for r in ours
        ]
        assert np.median(best) >= 0.7, best


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kernel", "kwargs"),
    [(False, {}), (False, THRESHOLDS_AT_ZERO), (True, {})],
    ids=["default", "zero", "kernel-default"],
)
def test_parity_vit_b_at_1024(kernel, kwargs):
    """Full size: ViT-B, 1024 px input, a non-square 600 x 800 image.

    Random ViT-B weights predict IoUs below 0.88, so the default settings keep
    nothing; the kernel decoder on the ViT-B encoder keeps many local masks.
    """
    torch.manual_seed(0)
    model = randomize_(build_model("vit_b"), seed=0)
    ref = reference_for(model)
    if kernel:
        decoder = KernelDecoder(model.prompt_encoder)
        model.mask_decoder = ref.mask_decoder = decoder
    rng = np.random.default_rng(2)
    image = (rng.random((600, 800, 3)) * 255).astype(np.uint8)
    kwargs = {"points_per_side": 8, **kwargs}
    theirs = _reference_masks(ref, image, **kwargs)
    ours = generate_masks(model, image, **kwargs)
    assert_same_masks(ours, theirs)
    assert len(ours) >= (10 if kernel else 0)


def test_embedding_input_gives_the_same_masks(image, amg_model):
    kwargs = {"points_per_side": 8, **THRESHOLDS_AT_ZERO}
    from_image = generate_masks(amg_model, image, **kwargs)
    from_embedding = generate_masks(amg_model, encode_image(amg_model, image), **kwargs)
    assert len(from_image) == len(from_embedding) == 192
    for a, b in zip(from_image, from_embedding, strict=True):
        assert np.array_equal(a.segmentation, b.segmentation)
        assert a.predicted_iou == b.predicted_iou


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_iou_threshold_before_the_decoder_upscaling_keeps_the_masks(image, amg_model, threshold):
    """Points with no mask above pred_iou_thresh skip the upscaling; the rest are unchanged."""
    kwargs = {"points_per_side": 8, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    ours = generate_masks(amg_model, image, pred_iou_thresh=threshold, **kwargs)
    everything = generate_masks(amg_model, image, pred_iou_thresh=0.0, **kwargs)
    expected = [r for r in everything if threshold == 0.0 or r.predicted_iou > threshold]
    assert 0 < len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        assert a.point_xy == b.point_xy and a.predicted_iou == b.predicted_iou
        assert np.array_equal(a.segmentation, b.segmentation)


def _record_precisions(monkeypatch) -> dict[str, list]:
    """Spy on automatic's encoder and decoder calls: the precision each was asked for.

    ``"encode"`` lists the ``precision`` arguments, ``"decode"`` pairs of the
    embedding's precision and the ``precision`` argument.
    """
    seen: dict[str, list] = {"encode": [], "decode": []}
    real_encode, real_decode = automatic.encode_image, automatic.decode_low_res

    def encode(*args, **kwargs):
        seen["encode"].append(kwargs.get("precision"))
        return real_encode(*args, **kwargs)

    def decode(model, embedding, **kwargs):
        seen["decode"].append((embedding.precision, kwargs.get("precision")))
        return real_decode(model, embedding, **kwargs)

    monkeypatch.setattr(automatic, "encode_image", encode)
    monkeypatch.setattr(automatic, "decode_low_res", decode)
    return seen


def test_precision_reaches_encoder_and_decoder(image, amg_model, monkeypatch):
    from napari_sam import predict

    seen = _record_precisions(monkeypatch)
    kwargs = {"points_per_side": 4, **THRESHOLDS_AT_ZERO}
    exact = generate_masks(amg_model, image, **kwargs)
    fp32 = generate_masks(amg_model, image, precision="fp32", **kwargs)
    assert seen["encode"] == ["exact", "fp32"]
    assert {asked for _, asked in seen["decode"]} == {None, "fp32"}
    for a, b in zip(exact, fp32, strict=True):  # exact is fp32: the same masks
        assert np.array_equal(a.segmentation, b.segmentation)
    half = predict.encode_image(amg_model, image, precision="bf16")
    assert half.precision == "bf16"
    records = generate_masks(amg_model, half, **kwargs)  # the decoder follows the embedding
    assert len(records) == len(exact)
    ious = [_mask_iou(a.segmentation, b.segmentation) for a, b in zip(records, exact, strict=True)]
    assert np.mean(ious) > 0.8
    with pytest.raises(ValueError, match="precision must be one of"):
        generate_masks(amg_model, image, precision="double", **kwargs)


def test_decoder_precision_decodes_apart_from_the_encoder(image, amg_model, monkeypatch):
    from napari_sam import predict

    seen = _record_precisions(monkeypatch)
    kwargs = {"points_per_side": 4, **THRESHOLDS_AT_ZERO}
    mixed = generate_masks(amg_model, image, precision="bf16", decoder_precision="exact", **kwargs)
    assert seen["encode"] == ["bf16"]  # the image is encoded in bf16 ...
    assert seen["decode"] and set(seen["decode"]) == {("bf16", "exact")}  # ... decoded in fp32
    half = predict.encode_image(amg_model, image, precision="bf16")
    same = generate_masks(amg_model, half, precision="exact", **kwargs)  # the same, spelled out
    assert len(mixed) == len(same) > 0
    for a, b in zip(mixed, same, strict=True):
        assert np.array_equal(a.segmentation, b.segmentation)
    seen["decode"].clear()
    generate_masks(amg_model, half, **kwargs)  # without it the decoder follows the embedding
    assert set(seen["decode"]) == {("bf16", None)}
    with pytest.raises(ValueError, match=r"decoder_precision must be one of .* received 'double'"):
        generate_masks(amg_model, image, decoder_precision="double", **kwargs)
    assert seen["encode"] == ["bf16"]  # refused before any encoding


def test_results_do_not_depend_on_points_per_batch(image, amg_model):
    kwargs = {"points_per_side": 8, **THRESHOLDS_AT_ZERO}
    big = generate_masks(amg_model, image, points_per_batch=64, **kwargs)
    small = generate_masks(amg_model, image, points_per_batch=7, **kwargs)
    assert [r.point_xy for r in big] == [r.point_xy for r in small]
    for a, b in zip(big, small, strict=True):
        assert _mask_iou(a.segmentation, b.segmentation) >= 0.999
        assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=1e-5)


def test_cpu_decoder_sub_batches_do_not_change_results(image, amg_model, monkeypatch):
    kwargs = {"points_per_side": 8, "points_per_batch": 20, **THRESHOLDS_AT_ZERO}
    whole = generate_masks(amg_model, image, **kwargs)
    calls = []
    real = automatic.decode_low_res

    def counting(*args, **kw):
        calls.append(kw["points_xy"].shape[0])
        return real(*args, **kw)

    monkeypatch.setattr(automatic, "decode_low_res", counting)
    monkeypatch.setattr(automatic, "_CPU_DECODE_PIXELS", 3 * 32 * 32)  # 3 prompts per call
    split = generate_masks(amg_model, image, **kwargs)
    assert max(calls) == 3 and sum(calls) == 64
    assert len(split) == len(whole)
    for a, b in zip(whole, split, strict=True):
        assert a.point_xy == b.point_xy
        assert _mask_iou(a.segmentation, b.segmentation) >= 0.999
        assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=1e-5)


def test_record_fields_are_consistent(image, amg_model):
    records = generate_masks(amg_model, image, points_per_side=4, **THRESHOLDS_AT_ZERO)
    for r in records:
        mask = r.segmentation
        assert mask.dtype == bool and mask.shape == SHAPE_HW == r.shape_hw
        assert r.area == int(mask.sum())
        ys, xs = np.nonzero(mask)
        x0, y0, w, h = r.bbox_xywh
        assert (x0, y0, x0 + w, y0 + h) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert r.crop_box_xywh == (0, 0, SHAPE_HW[1], SHAPE_HW[0])
        assert all(isinstance(v, int) for v in (*r.bbox_xywh, r.area, *r.crop_box_xywh))
        assert isinstance(r.predicted_iou, float) and isinstance(r.stability_score, float)
    with pytest.raises(AttributeError):
        records[0].area = 3  # frozen


def test_iou_filter_runs_before_upsampling(image, amg_model, monkeypatch):
    """Only masks above pred_iou_thresh are upsampled, a bounded chunk at a time."""
    from napari_sam import predict

    points = 8
    emb = encode_image(amg_model, image)
    grid = automatic.ops.point_grid(points) * np.array([SHAPE_HW[1], SHAPE_HW[0]])
    low = predict.decode_low_res(
        amg_model,
        emb,
        points_xy=torch.from_numpy(grid)[:, None],
        point_labels=torch.ones((len(grid), 1), dtype=torch.int64),
        boxes_xyxy=None,
        mask_input=None,
        multimask=True,
    )
    expected = int((low.iou_scores > 0.5).sum())
    assert 0 < expected < 3 * points * points
    seen = []

    def counting(logits, embedding):
        seen.append(logits.shape[0] * logits.shape[1])
        return predict.upscale_logits(logits, embedding)

    monkeypatch.setattr(automatic, "upscale_logits", counting)
    monkeypatch.setattr(automatic, "_CHUNK_ELEMENTS", 10 * 128 * 128)
    generate_masks(
        amg_model, emb, points_per_side=points, pred_iou_thresh=0.5, stability_score_thresh=0.0
    )
    assert sum(seen) == expected
    assert max(seen) <= 10


def test_progress_reports_every_step(image, amg_model):
    calls = []
    generate_masks(
        amg_model,
        image,
        points_per_side=8,
        points_per_batch=10,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = 1 + 7  # one encoding, ceil(64 / 10) batches
    assert calls == [(i, total) for i in range(total + 1)]

    calls.clear()
    generate_masks(
        amg_model,
        image,
        points_per_side=4,
        crop_n_layers=1,
        min_mask_region_area=10,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = 5 * (1 + 1) + 1  # five crops: encoding + one batch each; the clean-up
    assert calls[0] == (0, total) and calls[-1] == (total, total) and len(calls) == total + 1


def test_cancel_stops_between_batches(image, amg_model, monkeypatch):
    from napari_sam import predict

    decoded = []

    def counting_decode(*args, **kwargs):
        decoded.append(1)
        return predict.decode_low_res(*args, **kwargs)

    monkeypatch.setattr(automatic, "decode_low_res", counting_decode)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 3

    progress = []
    with pytest.raises(Cancelled, match="cancelled"):
        generate_masks(
            amg_model,
            image,
            points_per_side=8,
            points_per_batch=8,
            cancel=cancel,
            progress=lambda d, t: progress.append(d),
        )
    # polls: before encoding, then before each batch; the 4th poll cancels
    assert len(decoded) == 2
    assert progress == [0, 1, 2, 3]
    # a cancel that never fires changes nothing
    out = generate_masks(amg_model, image, points_per_side=4, cancel=lambda: False)
    assert len(out) == len(generate_masks(amg_model, image, points_per_side=4))


def test_cancel_before_start_runs_no_model(image, amg_model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the encoder must not run")

    monkeypatch.setattr(automatic, "encode_image", fail)
    with pytest.raises(Cancelled):
        generate_masks(amg_model, image, cancel=lambda: True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"points_per_side": 0}, "points_per_side must be an integer >= 1, got 0"),
        ({"points_per_batch": 2.5}, "points_per_batch must be an integer >= 1, got 2.5"),
        ({"crop_n_layers": True}, "crop_n_layers must be an integer >= 0, got True"),
        ({"pred_iou_thresh": 1.5}, r"pred_iou_thresh must be in \[0, 1\], got 1.5"),
        ({"box_nms_thresh": -0.1}, r"box_nms_thresh must be in \[0, 1\], got -0.1"),
        ({"crop_overlap_ratio": 1.0}, r"crop_overlap_ratio must be in \[0, 1\), got 1.0"),
        ({"stability_score_offset": -1.0}, "stability_score_offset must be >= 0, got -1.0"),
        ({"min_mask_region_area": -5}, "min_mask_region_area must be an integer >= 0, got -5"),
        (
            {"points_per_side": 4, "crop_n_layers": 1, "crop_n_points_downscale_factor": 8},
            r"points_per_side / crop_n_points_downscale_factor\*\*crop_n_layers must be >= 1",
        ),
    ],
)
def test_invalid_parameters_are_named(image, amg_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_masks(amg_model, image, **kwargs)


def test_embedding_with_crops_is_refused(image, amg_model):
    emb = encode_image(amg_model, image)
    with pytest.raises(ValueError, match="crop_n_layers must be 0 when an ImageEmbedding"):
        generate_masks(amg_model, emb, crop_n_layers=1)


def test_grayscale_microscopy_image(amg_model):
    rng = np.random.default_rng(5)
    image16 = (rng.random(SHAPE_HW) * 4000).astype(np.uint16)
    records = generate_masks(
        amg_model, image16, points_per_side=4, contrast_limits=(0, 4000), **THRESHOLDS_AT_ZERO
    )
    assert len(records) == 48 and records[0].shape_hw == SHAPE_HW


def _candidates(masks: list[np.ndarray]) -> Candidates:
    from napari_sam import _amg_ops as ops

    n = len(masks)
    return Candidates(
        [RunLengthMask.from_mask(m) for m in masks],
        ops.mask_boxes_xyxy(torch.from_numpy(np.stack(masks))),
        torch.linspace(0.9, 0.8, n),
        torch.ones(n),
        np.arange(2 * n, dtype=np.float64).reshape(n, 2),
        np.zeros(n, dtype=np.int64),
    )


def test_clean_small_regions_prefers_unchanged_masks():
    holed = np.zeros((20, 20), bool)
    holed[2:12, 2:12] = True
    holed[5, 5] = False  # a one-pixel hole
    holed[18, 18] = True  # a one-pixel island
    clean = np.zeros((20, 20), bool)
    clean[2:12, 2:12] = True  # what clean-up makes of `holed`
    other = np.zeros((20, 20), bool)
    other[14:19, 1:6] = True
    found = _candidates([holed, clean, other])
    out = clean_small_regions(found, 4, 0.7)
    # `holed` changed (score 0) and duplicates `clean` (score 1): NMS drops it
    assert len(out) == 2
    assert np.array_equal(out.rles[0].decode(), clean)
    assert np.array_equal(out.rles[1].decode(), other)
    assert out.points_xy.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    # without the duplicate, the cleaned mask is kept, with its new box and area
    out = clean_small_regions(_candidates([holed, other]), 4, 0.7)
    assert np.array_equal(out.rles[1].decode(), clean)  # changed masks come last
    assert out.boxes_xyxy[1].tolist() == [2, 2, 11, 11]
    assert out.rles[1].area == 100


def test_min_mask_region_area_end_to_end(image):
    from napari_sam import _amg_ops as ops

    model, _ = _pair("tiny_vit_b", kernel=True)
    kwargs = {"points_per_side": 8, **THRESHOLDS_AT_ZERO}
    plain = generate_masks(model, image, **kwargs)
    cleaned = generate_masks(model, image, min_mask_region_area=40, **kwargs)
    assert 0 < len(cleaned) <= len(plain)
    for r in cleaned:
        mask = r.segmentation
        assert not ops.remove_small_regions(mask, 40, mode="islands")[1]
        ys, xs = np.nonzero(mask)
        assert r.area == mask.sum()
        assert r.bbox_xywh[:2] == (xs.min(), ys.min())
    assert any(
        not np.array_equal(a.segmentation, b.segmentation)
        for a, b in zip(plain, cleaned, strict=False)
    )


def test_records_to_labels_follows_masks_to_labels(image):
    model, _ = _pair("tiny_vit_b", kernel=True)
    records = generate_masks(model, image, points_per_side=8, **THRESHOLDS_AT_ZERO)
    masks = [r.segmentation for r in records]
    for min_area in (0, 30):
        ours = automatic.records_to_labels(records, min_area=min_area)
        assert np.array_equal(ours, masks_to_labels(masks, min_area=min_area))
    labels = automatic.records_to_labels(records[:2], start_id=5)
    assert set(np.unique(labels)) <= {0, 5, 6}
    assert automatic.records_to_labels([], shape_hw=(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="shape_hw is required"):
        automatic.records_to_labels([])


def test_coco_json_round_trip(tmp_path, image):
    model, _ = _pair("tiny_vit_b", kernel=True)
    records = generate_masks(model, image, points_per_side=4, **THRESHOLDS_AT_ZERO)
    first = records[0]
    records.append(
        MaskRecord(
            first.rle, first.bbox_xywh, first.area, 0.5, float("nan"), (1.0, 2.0), (0, 0, 1, 1)
        )
    )
    path = automatic.write_coco_rle_json(records, tmp_path / "masks.json", file_name="img.tif")
    import json

    data = json.loads(path.read_text())
    assert data["image"] == {"image_id": 0, "width": 140, "height": 96, "file_name": "img.tif"}
    assert data["annotations"][-1]["stability_score"] is None
    assert isinstance(data["annotations"][0]["segmentation"]["counts"], str)
    back = automatic.read_coco_rle_json(path)
    assert len(back) == len(records)
    for a, b in zip(records, back, strict=True):
        assert np.array_equal(a.segmentation, b.segmentation)
        assert (a.bbox_xywh, a.area, a.point_xy, a.crop_box_xywh) == (
            b.bbox_xywh,
            b.area,
            b.point_xy,
            b.crop_box_xywh,
        )
        assert a.predicted_iou == b.predicted_iou
    assert math.isnan(back[-1].stability_score)

    mask_utils = pytest.importorskip("pycocotools.mask")
    for ann, record in zip(data["annotations"], records, strict=True):
        decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert np.array_equal(decoded, record.segmentation)
        assert int(mask_utils.area(ann["segmentation"])) == record.area


@pytest.mark.parametrize("name", sorted(automatic.PRESETS))
def test_presets_are_valid_settings(image, amg_model, name):
    import dataclasses

    settings = automatic.PRESETS[name]
    assert automatic.AutomaticSettings(**dataclasses.asdict(settings)) == settings
    small = dataclasses.replace(settings, points_per_side=8)
    records = automatic.generate_with_settings(amg_model, image, small)
    assert all(isinstance(r, MaskRecord) for r in records)
    assert automatic.PRESETS["SAM defaults"] == automatic.AutomaticSettings()
