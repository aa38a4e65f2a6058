"""Text prompts: CLIP loading and offline rules, crops, batching, ranking, output.

A tiny randomly initialised open_clip model (custom config, no download)
covers the real CLIP path; a deterministic stand-in encoder, which embeds a
crop as its mean colour and a text as the colour it names, proves the
ranking logic (right candidate, threshold, top_k, classes, prompts).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from napari_sam import _clip, _text_crops
from napari_sam.automatic import AutomaticSettings, Cancelled, MaskRecord
from napari_sam.predict import encode_image
from napari_sam.text import (
    AutomaticMaskCache,
    ClipWeightsUnavailableError,
    CropSettings,
    TextSegmentation,
    embed_texts,
    load_clip,
    segment_text,
)
from napari_sam.weights import CheckpointError, CheckpointFormatError

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FEW_POINTS = AutomaticSettings(
    points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
)


# --------------------------------------------------------------------------- #
# fixtures: a tiny real CLIP and a colour stand-in
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def open_clip():
    """open_clip (the tests of the ranking logic need no CLIP)."""
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, open_clip):
    """``local-dir:`` folder with a tiny config and its (random, seeded) weights."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.manual_seed(0)
    clip = load_clip(pretrained=f"local-dir:{folder}")
    torch.save(clip.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tiny_dir):
    return load_clip(pretrained=f"local-dir:{tiny_dir}")


COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColourClip:
    """Stand-in CLIP: a crop's embedding is its mean colour, a text's the colour it names.

    Grey (0.5) is the normalisation mean, so a grey-suppressed outside adds
    nothing; the 4th axis is "no colour", which is what "background" names.
    """

    image_size = 16
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    logit_scale = 100.0

    def __init__(self):
        self.batches: list[int] = []

    def encode_images(self, pixels):
        self.batches.append(len(pixels))
        colour = pixels.mean(dim=(2, 3))  # B x 3, grey -> 0
        chroma = colour.norm(dim=1, keepdim=True)
        out = torch.cat([colour, 0.3 * torch.ones_like(chroma)], dim=1)
        return out / out.norm(dim=1, keepdim=True)

    def encode_texts(self, texts):
        rows = []
        for text in texts:
            name = next((c for c in COLOURS if c in text), None)
            if name is None:
                rows.append([0.0, 0.0, 0.0, 1.0])
            else:
                rgb = np.array(COLOURS[name]) * 2 - 1  # normalised like the pixels
                rows.append([*rgb, 0.0])
        out = torch.tensor(rows, dtype=torch.float32)
        return out / out.norm(dim=1, keepdim=True)


def square(shape_hw, x0, y0, side):
    mask = np.zeros(shape_hw, bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


@pytest.fixture
def scene():
    """Grey 80 x 100 image with a red, a green, a blue and a second red square."""
    image = np.full((80, 100, 3), 128, np.uint8)
    places = {"red": (5, 5), "green": (40, 5), "blue": (70, 40), "red2": (10, 50)}
    masks = []
    for name, (x, y) in places.items():
        mask = square(image.shape[:2], x, y, 20)
        image[mask] = (255 * np.array(COLOURS[name.rstrip("2")])).astype(np.uint8)
        masks.append(mask)
    return image, np.stack(masks)


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def test_tiny_clip_record(tiny_clip):
    assert tiny_clip.image_size == 32
    assert tiny_clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert not tiny_clip.model.training
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())
    img = tiny_clip.encode_images(torch.zeros(3, 3, 32, 32))
    txt = tiny_clip.encode_texts(["a nucleus", "a cell"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(AttributeError):
        tiny_clip.name = "other"


def test_local_dir_and_file_load_the_same_weights(tiny_dir, tiny_clip, open_clip):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # a random init would differ
    again = load_clip(pretrained=f"local-dir:{tiny_dir}")
    assert torch.equal(again.encode_images(pixels), tiny_clip.encode_images(pixels))

    (tiny_dir.parent / "napari-sam-test-tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tiny_dir.parent / "napari-sam-test-tiny.json")
    by_file = load_clip("napari-sam-test-tiny", tiny_dir / "open_clip_pytorch_model.bin")
    assert by_file.name == "napari-sam-test-tiny"
    assert torch.equal(by_file.encode_images(pixels), tiny_clip.encode_images(pixels))
    assert torch.equal(by_file.encode_texts(["x"]), tiny_clip.encode_texts(["x"]))


def test_quick_gelu_switch(tiny_dir, open_clip):
    def activations(clip):
        return {type(m).__name__ for m in clip.model.modules() if "GELU" in type(m).__name__}

    (tiny_dir.parent / "napari-sam-test-tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tiny_dir.parent / "napari-sam-test-tiny.json")
    assert activations(load_clip("napari-sam-test-tiny", None)) == {"GELU"}
    assert activations(load_clip("napari-sam-test-tiny", None, quick_gelu=True)) == {"QuickGELU"}


def test_bad_names_tags_and_files(tmp_path, open_clip):
    with pytest.raises(ValueError, match="name: expected an open_clip architecture"):
        load_clip("ViT-Q-99", None)
    with pytest.raises(ValueError, match=r"pretrained: expected a tag of ViT-B-32 \(openai"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        load_clip(pretrained=f"local-dir:{tmp_path}")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>not weights</html>")
    with pytest.raises(CheckpointFormatError, match="cannot load CLIP weights"):
        load_clip("ViT-B-32", junk)


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"pip install napari-sam-lab\[clip\]"):
        load_clip("ViT-B-32", None)


# --------------------------------------------------------------------------- #
# cache and offline rules
# --------------------------------------------------------------------------- #
def _no_download(*args, **kwargs):
    raise AssertionError("the network must not be used")


def test_openai_offline_fails_quickly_and_clearly(monkeypatch, open_clip):
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    monkeypatch.setattr(_clip, "_probe_host", lambda cfg: "napari-sam-lab.invalid")
    for var in (*_clip._PROXY_VARS, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(ClipWeightsUnavailableError) as info:
        load_clip("ViT-B-32", "openai")
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    expected_file = _clip.clip_cache_dir() / "ViT-B-32-openai.safetensors"
    assert "cannot reach napari-sam-lab.invalid" in message
    assert "timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors" in (
        message
    )
    assert str(expected_file) in message and "quick_gelu=True" in message
    assert isinstance(info.value, CheckpointError)


def test_hf_offline_env_and_download_false_never_probe(monkeypatch, open_clip):
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_download)
    monkeypatch.setattr(_clip.socket, "create_connection", _no_download)
    with pytest.raises(ClipWeightsUnavailableError, match="downloads are disabled"):
        load_clip("ViT-B-32", "openai", download=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipWeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        load_clip("ViT-B-32", "openai")


def test_failed_download_is_wrapped(monkeypatch, tmp_path, open_clip):
    def fail(cfg, cache_dir):
        raise OSError("connection reset\nlong hub traceback")

    monkeypatch.setattr(_clip, "_offline_reason", lambda cfg: None)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fail)
    with pytest.raises(ClipWeightsUnavailableError, match=r"\(OSError: connection reset\)"):
        load_clip("ViT-B-32", "openai", cache_dir=tmp_path)


def test_cached_weights_found_on_disk_only(monkeypatch, tmp_path, open_clip):
    monkeypatch.setattr(_clip.socket, "create_connection", _no_download)
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert _clip.find_cached_weights("ViT-B-32", "openai", cfg, tmp_path) is None
    # what a hub download leaves behind
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    hub_file = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    hub_file.write_bytes(b"x")
    assert _clip.find_cached_weights("ViT-B-32", "openai", cfg, tmp_path) == hub_file
    # a file copied by hand wins
    flat = tmp_path / "ViT-B-32-openai.safetensors"
    flat.write_bytes(b"x")
    path, _ = _clip.resolve_weights(open_clip, "ViT-B-32", "openai", tmp_path, download=False)
    assert path == flat


# --------------------------------------------------------------------------- #
# crops
# --------------------------------------------------------------------------- #
def test_square_box_centres_object_with_margin():
    # columns 10..19 (w = 9 in MaskRecord convention), rows 30..33
    assert _text_crops.square_box_xyxy((10, 30, 9, 3), margin=0.25, min_side_px=8) == (
        7,
        24,
        22,
        39,
    )
    assert _text_crops.square_box_xyxy((5, 5, 0, 0), margin=0.25, min_side_px=8) == (1, 1, 9, 9)


def test_grey_crop_at_image_border():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:5, :5] = (255, 0, 0)
    mask = square((20, 20), 0, 0, 5)
    grey = (0.5, 0.25, 0.75)
    crops = _text_crops.prepare_crops(
        image, [mask], [(0, 0, 4, 4)], CropSettings(margin=0.5), size=10, mean=grey, std=(1, 1, 1)
    )
    assert crops.shape == (1, 3, 10, 10)
    out = crops[0] + torch.tensor(grey).view(3, 1, 1)  # back to 0..1
    # the 10 px crop spans -2..7: the object is rows/cols 3..6 at full weight
    assert torch.allclose(out[:, 4:6, 4:6], torch.tensor([1.0, 0, 0]).view(3, 1, 1), atol=1e-5)
    # outside the mask (padding and image alike) is the grey, i.e. 0 after normalisation
    assert torch.allclose(crops[0][:, 0, :], torch.zeros(3, 10), atol=1e-6)
    assert torch.allclose(crops[0][:, :, -1], torch.zeros(3, 10), atol=1e-6)


def test_blur_keeps_coarse_context_and_the_object():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255  # bright right half outside the object
    image[15:25, 5:15] = (0, 255, 0)
    mask = square((40, 40), 5, 15, 10)
    args = dict(size=40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    settings = CropSettings(margin=1.0, suppress="blur", blur_sigma=0.05)
    blur = _text_crops.prepare_crops(image, [mask], [(5, 15, 9, 9)], settings, **args)[0]
    grey = _text_crops.prepare_crops(
        image, [mask], [(5, 15, 9, 9)], CropSettings(margin=1.0), **args
    )[0]
    plain = _text_crops.prepare_crops(
        image, [mask], [(5, 15, 9, 9)], CropSettings(margin=1.0, suppress="none"), **args
    )[0]
    # crop spans columns -5..24: columns 25.. of the 30 px crop are the bright half
    assert float(plain[:, 20, -1].min()) == pytest.approx(1.0)
    assert float(grey[:, 20, -1].abs().max()) == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < float(blur[0, 20, -1]) <= 1.0  # blurred context survives
    inside = (slice(None), slice(17, 23), slice(17, 23))
    assert torch.allclose(blur[inside], plain[inside]) and torch.allclose(
        grey[inside], plain[inside]
    )


def test_crop_settings_validation():
    with pytest.raises(ValueError, match="suppress must be one of"):
        CropSettings(suppress="black")
    with pytest.raises(ValueError, match="margin must be"):
        CropSettings(margin=-1)


# --------------------------------------------------------------------------- #
# ranking logic with the stand-in encoder
# --------------------------------------------------------------------------- #
def test_right_candidate_wins(scene):
    image, masks = scene
    clip = ColourClip()
    result = segment_text(None, clip, image, "blue", candidates=masks, top_k=1)
    assert [o.candidate_index for o in result.objects] == [2]
    best = result.objects[0]
    assert best.text == "blue" and best.label == 1 and best.score > 0.99
    assert best.bbox_xywh == (70, 40, 19, 19) and best.area == 400
    assert np.array_equal(best.segmentation, masks[2])
    assert np.array_equal(result.labels, masks[2].astype(np.uint32))
    # the score is calibrated against "background": other colours score low
    assert result.scores.shape == (4, 1)
    assert np.all(np.delete(result.scores[:, 0], 2) < 0.5)


def test_threshold_and_top_k(scene):
    image, masks = scene
    clip = ColourClip()
    both_red = segment_text(None, clip, image, "red", candidates=masks)
    assert sorted(o.candidate_index for o in both_red.objects) == [0, 3]
    assert [o.label for o in both_red.objects] == [1, 2]
    assert both_red.objects[0].score >= both_red.objects[1].score
    assert set(np.unique(both_red.labels)) == {0, 1, 2}
    assert len(segment_text(None, clip, image, "red", candidates=masks, top_k=1).objects) == 1
    # a cooler temperature keeps every score inside (0, 1): threshold between them
    clip.logit_scale = 5.0
    everything = segment_text(None, clip, image, "red", candidates=masks, threshold=0.0)
    assert len(everything.objects) == 4
    red, other = everything.scores[[0, 3], 0], everything.scores[[1, 2], 0]
    assert 0.0 < other.max() < red.min() < 1.0
    middle = float(other.max() + red.min()) / 2
    kept = segment_text(None, clip, image, "red", candidates=masks, threshold=middle)
    assert sorted(o.candidate_index for o in kept.objects) == [0, 3]
    above = float(red.max()) + 1e-4
    assert segment_text(None, clip, image, "red", candidates=masks, threshold=above).objects == ()
    rel = sum(o.relative_score for o in everything.objects)
    assert rel == pytest.approx(1.0, abs=1e-5)


def test_several_texts_one_class_each(scene):
    image, masks = scene
    result = segment_text(None, ColourClip(), image, ["red", "blue"], candidates=masks)
    by_candidate = {o.candidate_index: o.text for o in result.objects}
    assert by_candidate == {0: "red", 2: "blue", 3: "red"}
    assert result.texts == ("red", "blue")
    classes = result.class_labels()
    assert classes[masks[0]].tolist() == [1] * 400 and classes[masks[2]].tolist() == [2] * 400
    assert classes[masks[1]].max() == 0  # green matched neither
    assert [o.candidate_index for o in result.for_text("blue")] == [2]
    top = segment_text(None, ColourClip(), image, ["red", "blue"], candidates=masks, top_k=1)
    assert sorted(o.text for o in top.objects) == ["blue", "red"]


def test_points_and_boxes_restrict_candidates(scene):
    image, masks = scene
    clip = ColourClip()
    # the box holds the second red square only: the best red object inside it
    inside = segment_text(
        None, clip, image, "red", candidates=masks, boxes_xyxy=[0, 40, 45, 79], top_k=1
    )
    assert [o.candidate_index for o in inside.objects] == [3]
    assert np.isnan(inside.scores[[0, 1, 2], 0]).all() and not np.isnan(inside.scores[3, 0])
    clicked = segment_text(None, clip, image, "red", candidates=masks, points_xy=[[12, 12]])
    assert [o.candidate_index for o in clicked.objects] == [0]
    nothing = segment_text(None, clip, image, "red", candidates=masks, points_xy=[[99, 0]])
    assert nothing.objects == () and nothing.labels.max() == 0
    assert clip.batches == [1, 1]  # excluded candidates are never embedded


def test_overlapping_objects_smaller_on_top():
    image = np.full((60, 60, 3), 128, np.uint8)
    big, small = square((60, 60), 5, 5, 40), square((60, 60), 15, 15, 10)
    image[big] = (255, 0, 0)
    result = segment_text(None, ColourClip(), image, "red", candidates=[small, big])
    assert len(result.objects) == 2
    small_label = next(o.label for o in result.objects if o.candidate_index == 0)
    assert np.all(result.labels[small] == small_label)


def test_batches(scene):
    image, masks = scene
    clip = ColourClip()
    many = np.concatenate([masks, masks[:3]])  # 7 candidates
    one_by_one = segment_text(None, clip, image, "red", candidates=many, batch_size=3)
    assert clip.batches == [3, 3, 1]
    clip.batches.clear()
    at_once = segment_text(None, clip, image, "red", candidates=many, batch_size=32)
    assert clip.batches == [7]
    np.testing.assert_allclose(one_by_one.scores, at_once.scores, rtol=1e-6)


def test_progress_and_cancel(scene):
    image, masks = scene
    calls = []
    segment_text(
        None,
        ColourClip(),
        image,
        "red",
        candidates=masks,
        batch_size=2,
        progress=lambda *a: calls.append(a),
    )
    assert calls[-1] == (3, 3)  # texts + 2 batches
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(Cancelled):
        segment_text(None, ColourClip(), image, "red", candidates=masks, cancel=lambda: True)


def test_templates_are_ensembled():
    class Recorder(ColourClip):
        def encode_texts(self, texts):
            self.seen = list(texts)
            return super().encode_texts(texts)

    clip = Recorder()
    feats = embed_texts(clip, ["red", "blue"], ["a {}.", "a microscopy image of a {}."])
    assert clip.seen == [
        "a red.",
        "a microscopy image of a red.",
        "a blue.",
        "a microscopy image of a blue.",
    ]
    assert feats.shape == (2, 4)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(text=""), "text: expected non-empty strings"),
        (dict(text=[]), "text: expected at least one text"),
        (dict(text=["a", "a"]), "texts must be distinct"),
        (dict(negative_texts=()), "negative_texts: expected at least one"),
        (dict(text="background"), "share"),
        (dict(templates=["no placeholder"]), "templates: expected"),
        (dict(threshold=1.5), "threshold must be a probability"),
        (dict(top_k=0), "top_k must be None or an integer >= 1"),
        (dict(boxes_xyxy=[1, 2, 3]), r"boxes_xyxy must be finite with shape \(N, 4\)"),
    ],
)
def test_invalid_arguments(scene, kwargs, match):
    image, masks = scene
    call = dict(text="red", candidates=masks) | kwargs
    text = call.pop("text")
    with pytest.raises(ValueError, match=match):
        segment_text(None, ColourClip(), image, text, **call)


def test_wrong_candidates_and_missing_inputs(scene, tiny_model):
    image, masks = scene
    with pytest.raises(ValueError, match=r"candidates\[0\]: expected a MaskRecord or a bool mask"):
        segment_text(None, ColourClip(), image, "red", candidates=[np.ones((5, 5), bool)])
    with pytest.raises(ValueError, match=r"candidates\[1\] is an empty mask"):
        segment_text(None, ColourClip(), image, "red", candidates=[masks[0], masks[0] & False])
    with pytest.raises(ValueError, match="model: a SAM model is needed"):
        segment_text(None, ColourClip(), image, "red")
    embedding = encode_image(tiny_model, image)
    with pytest.raises(ValueError, match="image: CLIP needs the pixels"):
        segment_text(tiny_model, ColourClip(), embedding, "red")
    with pytest.raises(ValueError, match="embedding was made for an image of shape"):
        segment_text(tiny_model, ColourClip(), embedding, "red", image=image[:50])


# --------------------------------------------------------------------------- #
# automatic candidates, the cache, the real tiny CLIP end to end
# --------------------------------------------------------------------------- #
def test_automatic_candidates_cached_and_reused(tiny_model, tiny_clip, scene):
    image, _ = scene
    cache = AutomaticMaskCache()
    first = segment_text(
        tiny_model, tiny_clip, image, "nucleus", automatic=FEW_POINTS, mask_cache=cache, threshold=0
    )
    assert (cache.hits, cache.misses) == (0, 1)
    assert first.candidates and all(isinstance(c, MaskRecord) for c in first.candidates)
    embedding = encode_image(tiny_model, image)
    again = segment_text(
        tiny_model,
        tiny_clip,
        embedding,
        ["nucleus", "cell"],
        image=image,
        automatic=FEW_POINTS,
        mask_cache=cache,
        threshold=0,
    )
    assert (cache.hits, cache.misses) == (1, 1)
    assert again.candidates[0] is first.candidates[0]
    other = AutomaticSettings(**{**FEW_POINTS.__dict__, "points_per_side": 3})
    segment_text(tiny_model, tiny_clip, image, "cell", automatic=other, mask_cache=cache)
    assert cache.misses == 2 and len(cache) == 2
    segment_text(tiny_model, tiny_clip, image[::-1].copy(), "x", automatic=other, mask_cache=cache)
    assert cache.misses == 3


def test_cache_is_per_model_and_bounded(tiny_model):
    from napari_sam.registry import build_model

    image = np.zeros((8, 8, 3), np.uint8)
    cache = AutomaticMaskCache(max_entries=2)
    cache.put(tiny_model, image, FEW_POINTS, ["r"])
    assert cache.get(tiny_model, image, FEW_POINTS) == ["r"]
    assert cache.get(build_model("tiny_vit_b"), image, FEW_POINTS) is None
    for side in (2, 3):
        cache.put(tiny_model, image, AutomaticSettings(points_per_side=side), [])
    assert len(cache) == 2 and cache.get(tiny_model, image, FEW_POINTS) is None


def test_tiny_clip_end_to_end(tiny_model, tiny_clip):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64), dtype=np.uint16)  # grayscale, 16 bits
    steps = []
    result = segment_text(
        tiny_model,
        tiny_clip,
        image,
        ["nucleus", "mitotic cell"],
        automatic=FEW_POINTS,
        threshold=0.0,
        top_k=5,
        batch_size=4,
        progress=lambda d, t: steps.append((d, t)),
    )
    assert isinstance(result, TextSegmentation)
    n = len(result.candidates)
    assert n > 4 and result.scores.shape == (n, 2)
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    assert 1 <= len(result.objects) <= 10
    scores = [o.score for o in result.objects]
    assert scores == sorted(scores, reverse=True)
    assert [o.label for o in result.objects] == list(range(1, len(result.objects) + 1))
    for o in result.objects:
        assert o.score == pytest.approx(result.scores[o.candidate_index, o.text_index])
        assert o.score == pytest.approx(result.scores[o.candidate_index].max())
    assert result.labels.shape == (48, 64) and result.labels.dtype == np.uint32
    assert set(np.unique(result.labels)) <= {0, *range(1, len(result.objects) + 1)}
    assert steps[-1][0] == steps[-1][1]


def test_triton_blocked_only_when_a_system_llvm_is_loaded(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    real_path = _clip.Path
    monkeypatch.setattr(_clip, "Path", lambda p: maps if p == "/proc/self/maps" else real_path(p))
    saved = sys.modules.pop("triton", None)
    try:
        maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libtorch_cpu.so\n")
        _clip._block_triton_if_it_would_crash()
        assert "triton" not in sys.modules
        maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
        _clip._block_triton_if_it_would_crash()
        assert sys.modules["triton"] is None
    finally:
        sys.modules.pop("triton", None)
        if saved is not None:
            sys.modules["triton"] = saved
