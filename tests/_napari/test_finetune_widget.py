"""Fine-tuning in napari: training pairs from layers (no display) and the dock widget (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from napari.components import ViewerModel

from napari_sam import weights
from napari_sam._napari import models
from napari_sam._napari._finetune_job import (
    collect_pairs,
    default_checkpoint_path,
    default_name,
    labelled_planes,
    make_request,
    parse_lr,
    run_training,
)
from napari_sam.synthetic import make_sample

TIMEOUT_MS = 120_000


@pytest.fixture(autouse=True)
def _own_model_list(monkeypatch):
    """Models registered by a test stay in that test."""
    monkeypatch.setattr(models, "LOCAL_MODELS", dict(models.LOCAL_MODELS))


def _sample(seed: int):
    sample = make_sample(seed, shape_hw=(64, 64), kind="nuclei", dtype=np.uint8, size_px=7.0)
    assert sample.labels.max() > 0
    return sample.image, sample.labels.astype(np.uint16)


def _stack(labelled=(0, 2), depth=3):
    """A (depth, 64, 64) image and labels with objects on the ``labelled`` slices only."""
    pairs = [_sample(seed) for seed in range(depth)]
    image = np.stack([p[0] for p in pairs])
    labels = np.zeros_like(np.stack([p[1] for p in pairs]))
    for z in labelled:
        labels[z] = pairs[z][1]
    return image, labels


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ------------------------------------------------------------ pairs (no display)
def test_pairs_of_a_2d_image_and_of_a_stack_are_copies():
    viewer = ViewerModel()
    image2d, labels2d = _sample(0)
    img = viewer.add_image(image2d, contrast_limits=(0, 128), name="plane")
    lab = viewer.add_labels(labels2d, name="plane labels")
    (pair,) = collect_pairs(img, lab)
    assert pair.source == "plane"
    assert pair.image_rgb.shape == (64, 64, 3) and pair.image_rgb.dtype == np.uint8
    assert pair.image_rgb.max() == 255  # through the layer's contrast limits
    assert np.array_equal(pair.labels, labels2d)
    pair.labels[:] = 0
    assert np.array_equal(lab.data, labels2d)  # a copy: the layer is never touched

    stack, stack_labels = _stack(labelled=(0, 2))
    simg = viewer.add_image(stack, name="stack")
    slab = viewer.add_labels(stack_labels, name="stack labels")
    assert [p.indices for p in labelled_planes(simg, slab)] == [(0, None, None), (2, None, None)]
    pairs = collect_pairs(simg, slab)
    assert [p.source for p in pairs] == ["stack[0]", "stack[2]"]
    assert np.array_equal(pairs[1].labels, stack_labels[2])


def test_bad_inputs_give_messages_that_say_what_to_do():
    viewer = ViewerModel()
    image, labels = _sample(0)
    img = viewer.add_image(image)
    with pytest.raises(ValueError, match="has shape \\(32, 32\\), image 'image' has shape"):
        labelled_planes(img, viewer.add_labels(np.zeros((32, 32), np.uint8)))
    with pytest.raises(ValueError, match="has no objects"):
        labelled_planes(img, viewer.add_labels(np.zeros((64, 64), np.uint8), name="empty"))
    with pytest.raises(ValueError, match="Choose an image layer"):
        labelled_planes(img, None)
    good = viewer.add_labels(labels)
    common = {"checkpoint_path": None, "steps": 2, "batch_size": 1, "lr": 1e-3}
    with pytest.raises(ValueError, match="No training pairs"):
        make_request([], name="ok", **common)
    with pytest.raises(ValueError, match="at least two labelled slices"):
        make_request([(img, good)], name="ok", hold_out=True, **common)
    with pytest.raises(ValueError, match="model name"):
        make_request([(img, good)], name="no spaces", **common)
    with pytest.raises(ValueError, match="taken by a built-in model"):
        make_request([(img, good)], name="vit_b", **common)
    default_checkpoint_path("mine").parent.mkdir(parents=True)
    default_checkpoint_path("mine").write_bytes(b"")  # an earlier fine-tuned model
    with pytest.raises(ValueError, match="'mine' is in the model list already"):
        make_request([(img, good)], name="mine", **common)
    with pytest.raises(ValueError, match="learning rate must be a positive number"):
        parse_lr("fast")
    with pytest.raises(ValueError, match="learning rate"):
        parse_lr("-1e-4")
    assert parse_lr("3e-4") == pytest.approx(3e-4)


def test_default_names_avoid_taken_ones():
    assert default_name("vit_b") == "vit_b-finetuned"
    assert default_name("sam_vit_b_01ec64.pth") == "sam_vit_b_01ec64-finetuned"
    path = default_checkpoint_path("vit_b-finetuned")
    assert path.parent == models.finetuned_dir()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert default_name("vit_b") == "vit_b-finetuned-2"


# ------------------------------------------------------------------ widget (Xvfb)
def _open(make_napari_viewer, tiny_model, *, labelled=(0, 2)):
    from napari_sam._napari.finetune_widget import FinetuneWidget

    viewer = make_napari_viewer()
    stack, stack_labels = _stack(labelled=labelled)
    image = viewer.add_image(stack, name="stack")
    labels = viewer.add_labels(stack_labels.copy(), name="curated")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Fine-tune")
    assert isinstance(widget, FinetuneWidget)
    widget.session.set_model(tiny_model)
    widget.steps_spin.setValue(4)
    widget.batch_spin.setValue(2)
    widget.lr_edit.setText("1e-3")
    return viewer, image, labels, widget


def _wait(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


@pytest.mark.gui
def test_widget_trains_saves_registers_and_is_used(make_napari_viewer, tiny_model, qtbot, tmp_path):
    from napari_sam._napari.widget import SamWidget

    viewer, image, labels, widget = _open(make_napari_viewer, tiny_model)
    _, interactive = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Segment Anything")
    assert isinstance(interactive, SamWidget) and interactive.session is widget.session
    curated = np.array(labels.data, copy=True)
    assert widget.image_combo.currentData() is image
    assert widget.labels_combo.currentData() is labels
    assert widget.add_pair()
    assert "2 slice(s)" in widget.pair_list.item(0).text()
    assert not widget.add_pair()  # the same pair twice
    widget.hold_out_check.setChecked(True)
    widget.name_edit.setText("tiny-ft")
    path = tmp_path / "out" / "tiny-ft.pt"
    widget.path_edit.setText(str(path))
    assert widget.train()
    assert widget.running and not widget.train_button.isEnabled()
    _wait(widget, qtbot)

    result = widget.result
    assert result is not None and not result.cancelled and result.steps_done == 4
    assert [r.step for r in widget.records] == [r.step for r in result.history] == [1, 2, 3, 4]
    assert [s for s, _ in widget.plot.series["loss"]] == [1, 2, 3, 4]
    assert len(widget.plot.series["one_click"]) == 4  # validation on the held-out slice
    assert widget.progress_bar.value() == 4
    assert path.is_file() and result.checkpoint_path == path
    loaded = weights.load_model(path)
    assert _same_weights(loaded, result.model)
    # offered everywhere, the session's model untouched until "Use in session"
    assert "tiny-ft" in models.model_names()
    names = [interactive.model_combo.itemData(i) for i in range(interactive.model_combo.count())]
    assert "tiny-ft" in names
    assert widget.session.model is tiny_model
    assert np.array_equal(labels.data, curated)
    assert "tiny-ft" in widget.status.text() and widget.name_edit.text() != "tiny-ft"
    assert widget.use_button.isEnabled() and widget.use_in_session()
    assert widget.session.model is result.model
    assert widget.session.models.source == "tiny-ft"
    assert interactive.model_combo.currentData() == "tiny-ft"


@pytest.mark.gui
def test_widget_cancel_writes_no_checkpoint(make_napari_viewer, tiny_model, qtbot, tmp_path):
    _, _, labels, widget = _open(make_napari_viewer, tiny_model)
    curated = np.array(labels.data, copy=True)
    widget.add_pair()
    widget.steps_spin.setValue(100_000)
    widget.name_edit.setText("never")
    path = tmp_path / "never.pt"
    widget.path_edit.setText(str(path))
    widget._relay.changed.connect(lambda done, total: widget.cancel())  # on the first step
    assert widget.train()
    _wait(widget, qtbot)
    assert widget.result.cancelled and widget.result.steps_done < 100
    assert "Cancelled" in widget.status.text() and "no checkpoint" in widget.status.text()
    assert not path.exists() and not list(tmp_path.glob("*.part"))
    assert "never" not in models.model_names()
    assert not widget.use_button.isEnabled() and widget.train_button.isEnabled()
    assert np.array_equal(labels.data, curated)


@pytest.mark.gui
def test_widget_bad_inputs_show_the_reason(make_napari_viewer, tiny_model):
    viewer, image, _, widget = _open(make_napari_viewer, tiny_model, labelled=())
    assert not widget.train()
    assert "No training pairs" in widget.status.text()
    assert not widget.add_pair()  # the labels have no object
    assert "has no objects" in widget.status.text()
    small = viewer.add_labels(np.ones((3, 32, 32), np.uint8), name="small")
    assert not widget.add_pair(image, small)
    assert "has shape (3, 32, 32)" in widget.status.text()
    good = viewer.add_labels(_stack()[1], name="good")
    assert widget.add_pair(image, good)
    widget.lr_edit.setText("fast")
    assert not widget.train()
    assert "learning rate" in widget.status.text()
    widget.lr_edit.setText("1e-3")
    widget.name_edit.setText("vit_b")
    assert not widget.train() and "taken" in widget.status.text()
    assert not widget.running
    viewer.layers.remove(good)  # a removed layer leaves the list
    assert widget.pairs == [] and widget.pair_list.count() == 0


# Last: in a fresh process, the widget test above must be the first to build a torch
# optimiser (torch._dynamo imports triton, which segfaults next to Mesa's LLVM; see
# prepare_torch), so that running this file alone checks it.
def test_run_training_trains_a_copy_and_saves_a_loadable_checkpoint(tiny_model, tmp_path):
    viewer = ViewerModel()
    img = viewer.add_image(_stack()[0])
    lab = viewer.add_labels(_stack()[1])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    request = make_request(
        [(img, lab)],
        name="tiny-ft",
        checkpoint_path=tmp_path / "tiny-ft.pt",
        steps=3,
        batch_size=2,
        lr=1e-3,
        hold_out=True,
    )
    assert len(request.train) == 1 and len(request.validation) == 1
    records = []
    result = run_training(request, tiny_model, device="cpu", log=records.append)
    assert result.model is not tiny_model and not result.cancelled
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert not _same_weights(result.model, tiny_model)
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.validation is not None for r in records)
    loaded = weights.load_model(result.checkpoint_path)
    assert loaded.config.name == "tiny_vit_b" and _same_weights(loaded, result.model)
