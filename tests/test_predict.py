"""Parity of napari_sam.predict with segment_anything.SamPredictor, and input validation.

Our model (``build_model`` + ``randomize_``) and the reference model carry the
same weights. fp32 outputs must agree to 1e-4 relative to their largest
magnitude; masks must be identical except at pixels whose reference logit is
within 1e-3 of the threshold.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.predict import (
    ImageEmbedding,
    MaskPrediction,
    Predictor,
    decode_low_res,
    encode_image,
    predict_masks,
    upscale_logits,
)

from ._reference import randomize_, reference_for

SIZES_HW = [(100, 37), (37, 100), (128, 128), (300, 201)]
RTOL = 1e-4
NEAR_THRESHOLD = 1e-3


def _build_pair(name: str, seed: int = 0):
    from napari_sam.registry import build_model

    torch.manual_seed(seed)
    ours = randomize_(build_model(name), seed=seed)
    return ours, reference_for(ours)


@pytest.fixture(scope="module")
def pair():
    """(our tiny_vit_b, reference SamPredictor class bound to the same weights)."""
    return _build_pair("tiny_vit_b")


class _Case:
    """One image encoded by both implementations."""

    def __init__(self, ours, ref, shape_hw, seed=0):
        from segment_anything import SamPredictor

        rng = np.random.default_rng(seed)
        self.shape_hw = shape_hw
        self.image = rng.integers(0, 256, (*shape_hw, 3), dtype=np.uint8)
        self.ours = ours
        self.embedding = encode_image(ours, self.image)
        self.ref = SamPredictor(ref)
        self.ref.set_image(self.image)


@pytest.fixture(scope="module")
def cases(pair):
    ours, ref = pair
    return {hw: _Case(ours, ref, hw, seed=i) for i, hw in enumerate(SIZES_HW)}


def _assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    expected = np.asarray(expected, dtype=np.float32)
    assert got.shape == expected.shape, what
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _assert_masks_match(masks: np.ndarray, ref_logits: np.ndarray) -> None:
    assert masks.dtype == np.bool_ and masks.shape == ref_logits.shape
    decided = np.abs(ref_logits) >= NEAR_THRESHOLD
    differ = (masks != (ref_logits > 0)) & decided
    assert not differ.any(), f"{differ.sum()} decided pixels differ"
    # the comparison is not vacuous: most pixels are decided, and both values occur
    assert decided.mean() > 0.9
    assert masks.any() and not masks.all()


def _assert_prediction_matches(pred: MaskPrediction, ref_out, batched: bool) -> None:
    logits, scores, low = (t.detach().cpu().numpy() if torch.is_tensor(t) else t for t in ref_out)
    if not batched:  # SamPredictor.predict drops the object axis
        logits, scores, low = logits[None], scores[None], low[None]
    _assert_close(pred.iou_scores, scores, "iou_scores")
    _assert_close(pred.low_res_logits, low, "low_res_logits")
    _assert_masks_match(pred.masks, logits)
    assert pred.iou_scores.dtype == np.float32 and pred.low_res_logits.dtype == np.float32


def _prompts(shape_hw, kind):
    """Prompts placed relative to the image size (original-frame pixels)."""
    h, w = shape_hw
    pts = np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.8 * h], [0.9 * w, 0.1 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h])
    return {
        "point": {"points_xy": pts[:1], "point_labels": np.array([1])},
        "points_with_negatives": {"points_xy": pts, "point_labels": np.array([1, 0, 0])},
        "box": {"boxes_xyxy": box},
        "box_and_points": {"boxes_xyxy": box, "points_xy": pts[:2], "point_labels": [1, 0]},
    }[kind]


def _reference_predict(case: _Case, prompts, multimask, mask_input=None):
    return case.ref.predict(
        point_coords=None if "points_xy" not in prompts else np.asarray(prompts["points_xy"]),
        point_labels=None if "point_labels" not in prompts else np.asarray(prompts["point_labels"]),
        box=prompts.get("boxes_xyxy"),
        mask_input=mask_input,
        multimask_output=multimask,
        return_logits=True,
    )


# --------------------------------------------------------------------------- #
# parity with the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape_hw", SIZES_HW)
def test_embedding_matches_reference(cases, shape_hw):
    case = cases[shape_hw]
    emb = case.embedding
    assert emb.original_hw == shape_hw
    assert emb.input_hw == tuple(case.ref.input_size)
    assert emb.img_size == 128 and emb.model_name == "tiny_vit_b" and emb.dtype == "float32"
    assert emb.features.shape == (1, 32, 8, 8) and emb.mask_input_hw == (32, 32)
    _assert_close(emb.features.numpy(), case.ref.features.numpy(), "features")


@pytest.mark.parametrize("shape_hw", SIZES_HW)
@pytest.mark.parametrize("kind", ["point", "points_with_negatives", "box", "box_and_points"])
@pytest.mark.parametrize("multimask", [True, False])
def test_prompt_matches_reference(cases, shape_hw, kind, multimask):
    case = cases[shape_hw]
    prompts = _prompts(shape_hw, kind)
    pred = predict_masks(case.ours, case.embedding, multimask=multimask, **prompts)
    m = 3 if multimask else 1
    assert pred.masks.shape == (1, m, *shape_hw)
    _assert_prediction_matches(pred, _reference_predict(case, prompts, multimask), batched=False)


@pytest.mark.parametrize("shape_hw", [(100, 37), (300, 201)])
def test_mask_prompt_fed_back_matches_reference(cases, shape_hw):
    case = cases[shape_hw]
    first = predict_masks(case.ours, case.embedding, **_prompts(shape_hw, "point"))
    _, ref_scores, ref_low = _reference_predict(case, _prompts(shape_hw, "point"), True)
    best = first.best()
    assert best.low_res_logits.shape == (1, 1, 32, 32)
    assert first.best_index[0] == int(np.argmax(ref_scores))

    prompts = _prompts(shape_hw, "points_with_negatives")
    pred = predict_masks(
        case.ours, case.embedding, mask_input=best.low_res_logits, multimask=False, **prompts
    )
    ref_mask_in = ref_low[np.argmax(ref_scores)][None]  # 1 x 4h x 4w, as SamPredictor wants
    ref = _reference_predict(case, prompts, False, mask_input=ref_mask_in)
    _assert_prediction_matches(pred, ref, batched=False)
    # the mask prompt changes the answer (so the comparison exercises it)
    without = predict_masks(case.ours, case.embedding, multimask=False, **prompts)
    assert not np.allclose(without.low_res_logits, pred.low_res_logits)


def _reference_batch(case: _Case, boxes, points=None, labels=None, multimask=True):
    tr, size = case.ref.transform, case.ref.original_size
    coords = None
    if points is not None:
        coords = tr.apply_coords_torch(torch.as_tensor(points, dtype=torch.float), size)
        labels = torch.as_tensor(labels, dtype=torch.int)
    return case.ref.predict_torch(
        coords,
        labels,
        boxes=tr.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), size),
        multimask_output=multimask,
        return_logits=True,
    )


@pytest.mark.parametrize("shape_hw", SIZES_HW)
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_boxes_match_reference(cases, shape_hw, multimask):
    case = cases[shape_hw]
    h, w = shape_hw
    boxes = np.array([[0, 0, w / 2, h / 2], [w / 3, h / 4, w - 1, h - 1], [5, 2, 9, 30]])
    pred = predict_masks(case.ours, case.embedding, boxes_xyxy=boxes, multimask=multimask)
    assert pred.masks.shape == (3, 3 if multimask else 1, h, w)
    _assert_prediction_matches(pred, _reference_batch(case, boxes, multimask=multimask), True)


@pytest.mark.parametrize("shape_hw", [(37, 100), (300, 201)])
def test_shared_points_apply_to_every_box(cases, shape_hw):
    case = cases[shape_hw]
    h, w = shape_hw
    boxes = np.array([[0, 0, w / 2, h / 2], [w / 3, h / 4, w - 1, h - 1]])
    points, labels = np.array([[w / 4, h / 4], [w / 2, h / 3]]), np.array([1, 0])
    pred = predict_masks(
        case.ours, case.embedding, boxes_xyxy=boxes, points_xy=points, point_labels=labels
    )
    ref = _reference_batch(case, boxes, np.stack([points] * 2), np.stack([labels] * 2))
    _assert_prediction_matches(pred, ref, batched=True)


def test_per_box_points_with_padding_match_reference(cases):
    case = cases[(300, 201)]
    boxes = np.array([[10, 10, 100, 150], [50, 100, 200, 299]])
    points = np.array([[[40, 60], [0, 0]], [[120, 200], [90, 250]]], dtype=float)
    labels = np.array([[1, -1], [1, 0]])  # the first box has one point, padded
    pred = predict_masks(
        case.ours, case.embedding, boxes_xyxy=boxes, points_xy=points, point_labels=labels
    )
    _assert_prediction_matches(pred, _reference_batch(case, boxes, points, labels), True)


def test_per_object_points_without_boxes_are_a_batch(cases):
    """(B, N, 2) points alone give B objects, each as if predicted on its own."""
    case = cases[(128, 128)]
    points = np.array([[[20.0, 30.0]], [[100.0, 64.0]]])
    pred = predict_masks(case.ours, case.embedding, points_xy=points, point_labels=[[1], [1]])
    assert pred.masks.shape == (2, 3, 128, 128)
    for b in range(2):
        ref = _reference_predict(case, {"points_xy": points[b], "point_labels": [1]}, True)
        _assert_prediction_matches(dataclasses.replace(pred.best(), **_row(pred, b)), ref, False)


def _row(pred: MaskPrediction, b: int) -> dict[str, np.ndarray]:
    return {f.name: getattr(pred, f.name)[b : b + 1] for f in dataclasses.fields(pred)}


def test_upscale_logits_matches_reference_postprocess(pair, cases):
    _, ref = pair
    case = cases[(300, 201)]
    low = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = ref.postprocess_masks(low, case.ref.input_size, case.ref.original_size)
    torch.testing.assert_close(upscale_logits(low, case.embedding), expected, rtol=0, atol=0)


def test_predictor_wrapper_matches_functions(pair, cases):
    ours, _ = pair
    case = cases[(100, 37)]
    predictor = Predictor(ours, precision="exact")
    with pytest.raises(RuntimeError, match=r"call Predictor.set_image\(image\) before predict"):
        predictor.predict(points_xy=[[5, 5]], point_labels=[1])
    emb = predictor.set_image(case.image)
    assert isinstance(emb, ImageEmbedding) and predictor.embedding is emb
    got = predictor.predict(points_xy=[[10, 20]], point_labels=[1], multimask=False)
    expected = predict_masks(
        ours, case.embedding, points_xy=[[10, 20]], point_labels=[1], multimask=False
    )
    np.testing.assert_array_equal(got.masks, expected.masks)
    np.testing.assert_array_equal(got.iou_scores, expected.iou_scores)
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="no image set"):
        _ = predictor.embedding


def test_encode_image_honours_contrast_limits_and_grayscale(pair):
    ours, _ = pair
    raw = np.random.default_rng(5).uniform(0, 4000, (40, 60)).astype(np.uint16)
    emb = encode_image(ours, raw, contrast_limits=(500, 3000))
    from napari_sam.image import prepare_image

    expected = encode_image(ours, prepare_image(raw, contrast_limits=(500, 3000)))
    torch.testing.assert_close(emb.features, expected.features, rtol=0, atol=0)
    assert emb.original_hw == (40, 60)
    stretched = encode_image(ours, raw)
    assert not torch.allclose(stretched.features, emb.features)


def test_encode_image_between_layers_pauses_or_abandons_without_changing_the_result(pair):
    ours, _ = pair
    image = np.random.default_rng(6).integers(0, 256, (40, 60), dtype=np.uint8)
    plain = encode_image(ours, image)
    calls = []
    paused = encode_image(ours, image, between_layers=lambda: calls.append(1))
    torch.testing.assert_close(paused.features, plain.features, rtol=0, atol=0)
    leaves = [m for m in ours.image_encoder.modules() if not m._modules]
    assert len(calls) >= len(leaves) > 10  # at least once per layer (some run per block)

    class Abandon(Exception):
        pass

    def abandon():
        if len(calls) == 5:
            raise Abandon
        calls.append(1)

    calls.clear()
    with pytest.raises(Abandon):
        encode_image(ours, image, between_layers=abandon)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="between_layers cannot be combined with compile"):
        encode_image(ours, image, compile=True, between_layers=abandon)


def test_best_selects_the_highest_score_per_object():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], np.float32)
    masks = np.zeros((2, 3, 2, 2), bool)
    masks[0, 1, 0, 0] = masks[1, 0, 1, 1] = True
    low = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 2, 2)
    best = MaskPrediction(masks=masks, iou_scores=scores, low_res_logits=low).best()
    np.testing.assert_array_equal(best.iou_scores, scores[[0, 1], [1, 0]][:, None])
    assert best.masks.shape == (2, 1, 2, 2)
    assert best.masks[0, 0, 0, 0] and best.masks[1, 0, 1, 1] and best.masks.sum() == 2
    np.testing.assert_array_equal(best.low_res_logits[:, 0], low[[0, 1], [1, 0]])


def test_outputs_do_not_track_gradients(cases):
    case = cases[(128, 128)]
    assert not case.embedding.features.requires_grad
    low = decode_low_res(
        case.ours,
        case.embedding,
        points_xy=torch.tensor([[[3.0, 4.0]]]),
        point_labels=torch.tensor([[1]]),
        boxes_xyxy=None,
        mask_input=None,
        multimask=True,
    )
    assert low.logits.shape == (1, 3, 32, 32) and low.iou_scores.shape == (1, 3)
    assert not low.logits.requires_grad


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"point_labels": [1]}, ValueError, "point_labels was given without points_xy"),
        ({"points_xy": [[1, 2]]}, ValueError, "points_xy needs point_labels"),
        (
            {"points_xy": [[1, 2], [3, 4]], "point_labels": [1]},
            ValueError,
            r"point_labels must have shape \(2,\) to match points_xy of shape \(2, 2\); "
            r"received \(1,\)",
        ),
        (
            {"points_xy": [[1, 2], [3, 4]], "point_labels": [1, 2]},
            ValueError,
            r"point_labels must be 1 \(foreground\), 0 \(background\) or -1 \(padding\); "
            "received 2",
        ),
        (
            {"points_xy": [1, 2], "point_labels": [1]},
            ValueError,
            r"points_xy must have shape \(N, 2\) or \(B, N, 2\); received \(2,\)",
        ),
        (
            {"points_xy": [[np.nan, 2]], "point_labels": [1]},
            ValueError,
            "points_xy contains NaN",
        ),
        ({"points_xy": [["a", 2]], "point_labels": [1]}, TypeError, "points_xy must be numeric"),
        (
            {"points_xy": [[5, 5], [40, 5]], "point_labels": [1, 0]},
            ValueError,
            r"points_xy\[1\] = \(40, 5\) lies outside the image of shape \(H, W\) = "
            r"\(100, 37\); x must be in \[-0.5, 36.5\]",
        ),
        (
            {"points_xy": [[5, -0.6]], "point_labels": [1]},
            ValueError,
            r"points_xy\[0\] = \(5, -0.6\) lies outside",
        ),
        (
            {"boxes_xyxy": [10, 5, 2, 20]},
            ValueError,
            r"boxes_xyxy\[0\] = \(10.0, 5.0, 2.0, 20.0\) must have x0 <= x1 and y0 <= y1",
        ),
        (
            {"boxes_xyxy": [[0, 0, 5, 5], [1, 9, 3, 4]]},
            ValueError,
            r"boxes_xyxy\[1\] = .* must have x0 <= x1 and y0 <= y1",
        ),
        (
            {"boxes_xyxy": [[0, 0, 5, 5, 1]]},
            ValueError,
            r"boxes_xyxy must have shape \(4,\) or \(B, 4\).*received \(1, 5\)",
        ),
        ({"boxes_xyxy": [0, 0, np.inf, 5]}, ValueError, "boxes_xyxy contains NaN or infinite"),
        (
            {"boxes_xyxy": [40, 0, 50, 5]},
            ValueError,
            r"boxes_xyxy\[0\] = .* does not overlap the image of shape \(H, W\) = \(100, 37\)",
        ),
        (
            {
                "boxes_xyxy": np.zeros((2, 4)),
                "points_xy": np.ones((3, 1, 2)),
                "point_labels": np.ones((3, 1)),
            },
            ValueError,
            r"every prompt must describe 1 or B objects \(B = 3\); received "
            r"\{'points_xy': 3, 'boxes_xyxy': 2\}",
        ),
        (
            {"boxes_xyxy": [0, 0, 5, 5], "mask_input": np.zeros((64, 64))},
            ValueError,
            r"mask_input must have shape \(32, 32\).*received \(64, 64\)",
        ),
        (
            {"boxes_xyxy": [0, 0, 5, 5], "mask_input": np.zeros((1, 3, 32, 32))},
            ValueError,
            r"received \(1, 3, 32, 32\); pass one mask per object, e.g. prediction.best\(\)",
        ),
        (
            {"boxes_xyxy": [0, 0, 5, 5], "mask_input": np.full((1, 32, 32), np.nan)},
            ValueError,
            "mask_input contains NaN",
        ),
        ({}, ValueError, "no prompt given: pass points_xy, boxes_xyxy or mask_input"),
        (
            {"points_xy": np.zeros((0, 2)), "point_labels": np.zeros(0)},
            ValueError,
            "no prompt given",
        ),
    ],
)
def test_invalid_prompts_are_refused_with_a_message(cases, kwargs, error, match):
    case = cases[(100, 37)]
    with pytest.raises(error, match=match):
        predict_masks(case.ours, case.embedding, **kwargs)


def test_accepted_prompt_edge_cases(cases):
    case = cases[(100, 37)]
    ours, emb = case.ours, case.embedding
    # points on the image border, a padding point far outside, a box reaching past the border
    pred = predict_masks(
        ours,
        emb,
        points_xy=[[-0.5, 99.5], [36.5, 0], [1e6, -1e6]],
        point_labels=np.array([1, 0, -1]),
        boxes_xyxy=[-20, -20, 10, 200],
    )
    assert pred.masks.shape == (1, 3, 100, 37)
    # boolean labels, an empty point set next to a box, a torch mask prompt of 1 for 2 boxes
    predict_masks(ours, emb, points_xy=[[3, 3]], point_labels=np.array([True]))
    pred = predict_masks(
        ours,
        emb,
        points_xy=np.zeros((0, 2)),
        point_labels=[],
        boxes_xyxy=[[0, 0, 5, 5], [1, 1, 30, 30]],
        mask_input=torch.zeros(1, 1, 32, 32),
    )
    assert pred.masks.shape == (2, 3, 100, 37)


def test_embedding_from_another_model_is_refused(cases):
    case = cases[(100, 37)]
    for change in ({"model_name": "vit_b"}, {"img_size": 1024}):
        other = dataclasses.replace(case.embedding, **change)
        with pytest.raises(ValueError, match="embedding was produced by a different model"):
            predict_masks(case.ours, other, boxes_xyxy=[0, 0, 5, 5])
    wide = dataclasses.replace(case.embedding, features=torch.zeros(1, 64, 8, 8))
    with pytest.raises(ValueError, match=r"\(64, 8, 8\).*\(32, 8, 8\).*run encode_image"):
        predict_masks(case.ours, wide, boxes_xyxy=[0, 0, 5, 5])


def test_decode_low_res_checks_batched_shapes(cases):
    case = cases[(100, 37)]
    kw = {"points_xy": None, "point_labels": None, "boxes_xyxy": None, "mask_input": None}
    with pytest.raises(ValueError, match="points_xy and point_labels must be given together"):
        decode_low_res(
            case.ours, case.embedding, multimask=True, **{**kw, "points_xy": torch.zeros(1, 1, 2)}
        )
    with pytest.raises(ValueError, match=r"boxes_xyxy must have shape \(B, 4\); received \(4,\)"):
        decode_low_res(
            case.ours, case.embedding, multimask=True, **{**kw, "boxes_xyxy": torch.zeros(4)}
        )
    with pytest.raises(ValueError, match=r"mask_input must have shape \(B, 1, 32, 32\)"):
        decode_low_res(
            case.ours,
            case.embedding,
            multimask=True,
            **{**kw, "mask_input": torch.zeros(1, 32, 32)},
        )
    with pytest.raises(ValueError, match=r"point_labels must have shape \(1, 3\)"):
        decode_low_res(
            case.ours,
            case.embedding,
            multimask=True,
            **{**kw, "points_xy": torch.zeros(1, 3, 2), "point_labels": torch.zeros(1, 2)},
        )
    with pytest.raises(ValueError, match=r"batch sizes .* must agree; received"):
        decode_low_res(
            case.ours,
            case.embedding,
            multimask=True,
            **{**kw, "boxes_xyxy": torch.zeros(2, 4), "mask_input": torch.zeros(3, 1, 32, 32)},
        )


# --------------------------------------------------------------------------- #
# full size
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_vit_b_at_1024_matches_reference_for_a_point_and_a_box():
    ours, ref = _build_pair("vit_b", seed=1)
    case = _Case(ours, ref, (480, 640), seed=7)
    assert case.embedding.features.shape == (1, 256, 64, 64)
    _assert_close(case.embedding.features.numpy(), case.ref.features.numpy(), "features")
    for kind in ("point", "box"):
        prompts = _prompts((480, 640), kind)
        pred = predict_masks(ours, case.embedding, multimask=kind == "point", **prompts)
        ref_out = _reference_predict(case, prompts, kind == "point")
        _assert_prediction_matches(pred, ref_out, batched=False)


@pytest.mark.parametrize(
    ("input_hw", "img_size"),
    [
        ((1024, 1024), 1024),
        ((1024, 700), 1024),
        ((640, 1024), 1024),
        ((256, 200), 256),
        ((512, 512), 2048),
    ],
)
def test_upscale_to_masks_equals_thresholded_upscaling(input_hw, img_size):
    from napari_sam._results import ImageEmbedding
    from napari_sam.predict import upscale_logits, upscale_to_masks

    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 3, 12, 12, generator=gen) * 6
    low = torch.nn.functional.interpolate(coarse, (256, 256), mode="bilinear")
    low[0, 0, 100:140, 30:90] = 0.0  # exact zeros: not above the threshold
    low[1, 2] = -torch.rand(256, 256, generator=gen)  # an empty mask
    low[1, 1] = torch.rand(256, 256, generator=gen) + 0.1  # a full one
    if img_size == 256:  # the demo model's factor 2: 128 x 128 logits
        low = low[..., ::2, ::2].contiguous()
    emb = ImageEmbedding(torch.zeros(1), input_hw, input_hw, img_size, "vit_b", "float32")
    masks = upscale_to_masks(low, emb)  # factor img_size / 256: 4, 1 (plain path), 8
    expected = upscale_logits(low, emb) > 0
    assert masks.dtype == torch.bool and masks.shape == (2, 3, *input_hw)
    assert torch.equal(masks, expected)
    assert not masks[1, 2].any() and masks[1, 1].all()


def test_upscale_to_masks_falls_back_where_the_shortcut_does_not_hold(monkeypatch):
    from napari_sam import predict
    from napari_sam._results import ImageEmbedding

    gen = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(
        torch.randn(1, 1, 8, 8, generator=gen) * 4, (256, 256), mode="bilinear"
    )
    ragged = torch.randn(1, 1, 256, 256, generator=gen)  # noise: most quads mixed
    calls = []
    real = predict.upscale_logits
    monkeypatch.setattr(predict, "upscale_logits", lambda *a: calls.append(1) or real(*a))
    square = ImageEmbedding(torch.zeros(1), (1024, 1024), (1024, 1024), 1024, "vit_b", "float32")
    resized = ImageEmbedding(torch.zeros(1), (300, 300), (1024, 1024), 1024, "vit_b", "float32")
    predict.upscale_to_masks(smooth, square)
    predict.upscale_to_masks(ragged, square)
    assert calls == []  # the sign-quad shortcut, then the row-by-row signs
    cases = [(smooth, resized, 0.0), (smooth, square, 0.5)]
    for low, emb, threshold in cases:
        got = predict.upscale_to_masks(low, emb, threshold)
        assert torch.equal(got, real(low, emb) > threshold)
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("input_hw", "img_size", "side"),
    [
        ((1024, 1024), 1024, 256),
        ((1024, 700), 1024, 256),
        ((637, 1024), 1024, 256),
        ((256, 200), 256, 128),
        ((1024, 1024), 1024, 128),
        ((5, 1024), 1024, 256),
    ],
)
def test_ragged_masks_equal_thresholded_upscaling(input_hw, img_size, side):
    from napari_sam._results import ImageEmbedding
    from napari_sam.predict import upscale_logits, upscale_to_masks

    gen = torch.Generator().manual_seed(2)
    low = torch.randn(2, 3, side, side, generator=gen)  # noise: most quads mixed
    low[0, 1, 10:40, 20:90] = 0.0  # exact zeros are not above 0
    low[1, 0] = torch.rand(side, side, generator=gen) + 0.1  # a full mask
    emb = ImageEmbedding(torch.zeros(1), input_hw, input_hw, img_size, "vit_b", "float32")
    masks = upscale_to_masks(low, emb)  # factors 4, 4, 4, 2, 8, 4
    expected = upscale_logits(low, emb) > 0
    assert masks.dtype == torch.bool and masks.shape == (2, 3, *input_hw)
    assert torch.equal(masks, expected)
    assert masks[1, 0].all() and 0.3 < masks[0, 0].float().mean() < 0.7
