"""Fine-tuning: the loss falls, checkpoints round-trip, cancel is clean, the demo model works."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sam._interactive import (
    Prompts,
    corrective_points,
    image_loss,
    initial_prompts,
    mask_losses,
    prepare_pairs,
    soft_targets,
)
from napari_sam.data import DEMO_CHECKPOINT
from napari_sam.evaluation import evaluate, inner_points
from napari_sam.registry import build_model, get_config
from napari_sam.synthetic import make_dataset, make_sample, sample_seed
from napari_sam.training import (
    Recipe,
    TrainingRecord,
    finetune,
    save_checkpoint,
)

from ._reference import build_reference


@pytest.fixture(scope="module")
def data():
    samples = make_dataset(4, seed=0, shape_hw=(128, 128), size_px=12.0)
    return [s.image for s in samples], [s.labels for s in samples]


def _fixed_loss(model, images, labels) -> float:
    """Interactive loss on fixed objects and prompts (same generator seed every call)."""
    prepared = prepare_pairs(images, labels, img_size=model.img_size)
    gen = torch.Generator().manual_seed(123)
    recipe = Recipe(objects_per_image=3, click_rounds=1)
    with torch.no_grad():
        batch, labs = prepared.batch(range(len(prepared)), model, augment=False, gen=gen)
        emb = model.image_encoder(batch)
        losses = [
            image_loss(model, emb[i : i + 1], prepared.pick_objects(lab, 3, gen), recipe, gen)
            for i, lab in enumerate(labs)
        ]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("train_encoder", [False, True])
def test_a_few_steps_lower_the_loss(data, train_encoder):
    torch.manual_seed(0)
    model = build_model("tiny_vit_b")
    before = _fixed_loss(model, *data)
    records: list[TrainingRecord] = []
    result = finetune(
        model,
        *data,
        train_encoder=train_encoder,
        steps=25,
        batch_size=2,
        lr=3e-3,
        recipe=Recipe(objects_per_image=3, click_rounds=1, warmup_steps=3, log_every=5),
        log=records.append,
    )
    after = _fixed_loss(model, *data)
    assert after < 0.9 * before, (before, after)
    assert result.steps_done == 25 and not result.cancelled
    assert [r.step for r in result.history] == [5, 10, 15, 20, 25] == [r.step for r in records]
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_tied_decoder_attention_start():
    from napari_sam.models.transformer import Attention
    from napari_sam.training import tie_decoder_attention_

    model = build_model("demo")
    encoder_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    assert tie_decoder_attention_(model) is model
    attentions = [m for m in model.mask_decoder.transformer.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2 * 3 + 1  # two layers of three attentions, and the final one
    for att in attentions:
        assert torch.equal(att.k_proj.weight, att.q_proj.weight)
        assert not att.q_proj.bias.any() and not att.k_proj.bias.any()
        assert not torch.equal(att.v_proj.weight, att.q_proj.weight)
    for key, value in model.image_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key])


def test_frozen_encoder_is_not_changed(data):
    model = build_model("tiny_vit_b")
    enc_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.mask_decoder.state_dict().items()}
    finetune(model, *data, steps=2, batch_size=2, lr=1e-3, recipe=Recipe(warmup_steps=1))
    for k, v in model.image_encoder.state_dict().items():
        torch.testing.assert_close(v, enc_before[k], rtol=0, atol=0)
    assert any(
        not torch.equal(v, dec_before[k]) for k, v in model.mask_decoder.state_dict().items()
    )


def test_checkpoint_round_trips_through_our_loader_and_the_reference(data, tmp_path):
    model = build_model("tiny_vit_b")
    path = tmp_path / "ft.pt"
    result = finetune(model, *data, steps=2, batch_size=2, lr=1e-3, checkpoint_path=path)
    assert result.checkpoint_path == path and path.is_file()
    ours = build_model(get_config("tiny_vit_b"), checkpoint=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    ref = build_reference(get_config("tiny_vit_b"))
    state = torch.load(path, weights_only=True)
    ref.load_state_dict(state, strict=True)
    assert set(state) == set(model.state_dict())


def test_half_precision_checkpoint_is_upcast_on_load(tmp_path):
    model = build_model("tiny_vit_b")
    path = save_checkpoint(model, tmp_path / "half.pt", dtype=torch.float16)
    state = torch.load(path, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    loaded = build_model("tiny_vit_b", checkpoint=path)
    for key, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[key].dtype
        if value.is_floating_point():
            torch.testing.assert_close(value, model.state_dict()[key].half().float())


def test_cancel_stops_and_leaves_no_checkpoint(data, tmp_path):
    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done == 2:
            stop.set()

    path = tmp_path / "never.pt"
    result = finetune(
        build_model("tiny_vit_b"),
        *data,
        steps=50,
        batch_size=1,
        lr=1e-3,
        progress=progress,
        cancel=stop,
        checkpoint_path=path,
    )
    assert result.cancelled and result.steps_done == 2
    assert calls == [(1, 50), (2, 50)]
    assert result.checkpoint_path is None
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    model = build_model("tiny_vit_b")
    path = save_checkpoint(model, tmp_path / "model.pt")
    good = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_time_budget_stops_training(data):
    result = finetune(
        build_model("tiny_vit_b"),
        *data,
        steps=10_000,
        batch_size=1,
        lr=1e-3,
        recipe=Recipe(time_budget_s=0.5),
    )
    assert 0 < result.steps_done < 10_000 and not result.cancelled


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
    ],
)
def test_invalid_arguments(data, kwargs, error, match):
    args = {"steps": 1, "batch_size": 1, "lr": 1e-3, **kwargs}
    with pytest.raises(error, match=match):
        finetune(build_model("tiny_vit_b"), *data, **args)


def test_mismatched_pairs_are_refused():
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match="equal length"):
        prepare_pairs([image], [], img_size=128)
    with pytest.raises(ValueError, match=r"labels\[0\] must have the image's shape"):
        prepare_pairs([image], [np.zeros((32, 31), np.int32)], img_size=128)
    with pytest.raises(TypeError, match="integer"):
        prepare_pairs([image], [np.zeros((32, 32), np.float32)], img_size=128)


def test_labels_are_resized_into_the_input_frame():
    labels = np.zeros((64, 32), np.int32)
    labels[:32] = 1
    prepared = prepare_pairs([np.zeros((64, 32), np.uint8)], [labels], img_size=128)
    lab = prepared.labels[0].numpy()
    assert lab.shape == (128, 128)
    assert prepared.images[0].shape == (128, 64, 3)
    assert (lab[:64, :64] == 1).all() and (lab[64:] == 0).all() and (lab[:, 64:] == 0).all()


def test_corrective_click_lies_in_the_error_region():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1.0
    logits = torch.full((2, 1, 16, 16), -5.0)
    logits[0, :, 4:12, 4:8] = 5.0  # object 0: right half missed
    logits[1, :, 0:12, 4:12] = 5.0  # object 1: spills over at the top
    coords, labels = corrective_points(logits, target, 64, torch.Generator().manual_seed(0))
    cell = (coords[:, 0] / 4).long()  # 64 px input, 16 px grid: 4 px per cell
    x, y = cell[:, 0], cell[:, 1]
    assert labels[:, 0].tolist() == [1, 0]
    assert 8 <= x[0] < 12 and 4 <= y[0] < 12
    assert 0 <= y[1] < 4


def test_corrective_click_is_padding_without_error():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 1
    _, labels = corrective_points(target * 10 - 5, target, 32, torch.Generator())
    assert labels.tolist() == [[-1]]


def test_initial_prompts_lie_on_their_objects():
    gt = torch.zeros(2, 32, 32, dtype=torch.bool)
    gt[0, 2:10, 3:8] = True
    gt[1, 20:30, 15:31] = True
    for seed in range(12):
        p = initial_prompts(gt, (0.34, 0.33, 0.33), 0.1, torch.Generator().manual_seed(seed))
        if p.boxes_xyxy is not None:
            assert p.coords_xy is None
            centre = (p.boxes_xyxy[:, :2] + p.boxes_xyxy[:, 2:]) / 2
            assert gt[torch.arange(2), centre[:, 1].long(), centre[:, 0].long()].all()
        else:
            xy = p.coords_xy.long()
            inside = gt[torch.arange(2)[:, None], xy[..., 1], xy[..., 0]]
            assert (inside == (p.labels == 1)).all()


def test_best_of_multimask_loss_and_soft_targets():
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True
    target = soft_targets(gt, (4, 4))
    assert target[0, 0].tolist()[0] == [1.0, 1.0, 0.0, 0.0]
    good = target * 20 - 10
    logits = torch.cat([-good, good, torch.zeros_like(good)], 1)
    per_mask = mask_losses(logits, target, Recipe().loss)
    assert per_mask.shape == (1, 3) and int(per_mask.argmin()) == 1


def test_inner_point_is_the_disc_centre():
    yy, xx = np.mgrid[:40, :50]
    disc = (yy - 20) ** 2 + (xx - 31) ** 2 <= 64
    border = np.zeros((40, 50), bool)
    border[:, :6] = True  # touches the image edge: the edge counts as boundary
    pts = inner_points(np.stack([disc, border, np.zeros_like(disc)]))
    assert pts[0].tolist() == [31, 20]
    assert pts[1, 0] in (2, 3) and pts[2].tolist() == [-1, -1]


def test_prompts_accumulate_points():
    p = Prompts(torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.long), None)
    q = p.add_points((torch.ones(2, 1, 2), torch.zeros(2, 1, dtype=torch.long)))
    assert p.is_single_point and not q.is_single_point
    assert q.labels.tolist() == [[1, 0], [1, 0]] and q.mask_logits is None


def test_evaluate_reports_small_and_large_objects(data):
    result = evaluate(build_model("tiny_vit_b"), *data, corrective_clicks=2, max_objects=3)
    n = len(result.areas)
    assert 0 < n <= 12 and result.clicks.shape == (n, 2)
    assert result.small.n_objects + result.large.n_objects == result.overall.n_objects == n
    assert ((result.one_click >= 0) & (result.one_click <= 1)).all()


# --------------------------------------------------------------------------- #
# The shipped demo model
# --------------------------------------------------------------------------- #
# Quality of the shipped demo model on held-out synthetic images (dataset seed
# 2, never trained on), a little below what it measured: one click 0.636, box
# 0.736, three corrective clicks 0.686 on these 24 images (docs/demo-model.md).
# The targets (0.85, 0.88) are not met by this checkpoint.
DEMO_ONE_CLICK_MIN = 0.60
DEMO_BOX_MIN = 0.70
NEEDS_DEMO = pytest.mark.skipif(
    not DEMO_CHECKPOINT.is_file(),
    reason="no demo checkpoint in this build: train it with scripts/train_demo.py",
)


@pytest.fixture(scope="module")
def demo_model():
    return build_model("demo", checkpoint=DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def held_out():
    samples = make_dataset(24, seed=2)
    return [s.image for s in samples], [s.labels for s in samples]


@NEEDS_DEMO
def test_shipped_checkpoint_is_small_half_precision_and_loads_into_the_reference():
    assert DEMO_CHECKPOINT.stat().st_size < 8 * 2**20
    state = torch.load(DEMO_CHECKPOINT, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    ref = build_reference(get_config("demo"))
    ref.load_state_dict(state, strict=True)
    ours = build_model("demo", checkpoint=DEMO_CHECKPOINT)
    assert {v.dtype for v in ours.state_dict().values() if v.is_floating_point()} == {torch.float32}


@NEEDS_DEMO
def test_demo_model_segments_held_out_objects(demo_model, held_out):
    result = evaluate(demo_model, *held_out, corrective_clicks=3, max_objects=20)
    overall = result.overall
    assert overall.n_objects >= 300
    assert overall.one_click_iou >= DEMO_ONE_CLICK_MIN, overall
    assert overall.box_iou >= DEMO_BOX_MIN, overall
    assert overall.corrective_iou[-1] > overall.one_click_iou, overall
    assert result.large.box_iou >= 0.85, result.large  # large objects: 0.888 measured


@NEEDS_DEMO
def test_demo_model_through_the_predictor(demo_model):
    from napari_sam.predict import encode_image, predict_masks

    sample = make_sample(sample_seed(2, 100), size_px=20.0, dtype=np.uint16)
    ids, areas = np.unique(sample.labels, return_counts=True)
    target = int(ids[1:][np.argmax(areas[1:])])
    mask = sample.labels == target
    embedding = encode_image(demo_model, sample.image)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)
    pred = predict_masks(demo_model, embedding, boxes_xyxy=box, multimask=False)
    got = pred.masks[0, 0]
    iou = (got & mask).sum() / (got | mask).sum()
    assert iou >= DEMO_BOX_MIN, iou
