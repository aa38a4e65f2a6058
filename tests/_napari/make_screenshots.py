"""Take the screenshots of docs/user-guide.md and docs/finetune.md (a script, not a test).

    xvfb-run -a -s "-screen 0 1400x1000x24" python tests/_napari/make_screenshots.py docs/images

Add ``finetune`` after the folder to take only ``finetune-widget.png`` (the
Fine-tune widget after a 60-step run), ``automatic`` for only
``automatic-widget.png`` (the Automatic segmentation widget after a run on
the nuclei sample).

Uses the ``demo`` model when it loads (``DEMO=/path/to/checkpoint`` tries
another file), else a randomly initialised tiny model (meaningless masks).
Prompts come from the synthetic samples' ground truth: a point deep inside
an object, boxes around objects.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication
from scipy import ndimage as ndi

from napari_sam import weights
from napari_sam._napari import _sample_data as sd
from napari_sam.data import DEMO_CHECKPOINT
from napari_sam.synthetic import make_sample

ROOT = Path(__file__).resolve().parents[2]


def best_model():
    """(model, name): the demo model if it loads, else random tiny weights."""
    try:
        try:
            return weights.load_model(os.environ.get("DEMO", "demo")), "demo"
        except ValueError:
            return weights.load_model(DEMO_CHECKPOINT), "demo"
    except Exception as exc:  # no demo in this build: show the UI with random weights
        print("demo not available:", exc)
        sys.path.insert(0, str(ROOT))
        from napari_sam.registry import build_model
        from tests._reference import randomize_

        return randomize_(build_model("tiny_vit_b"), seed=0), None


def pump(app, n=30):
    for _ in range(n):
        app.processEvents()
        time.sleep(0.01)


def wait(app, sam):
    start = time.time()
    while time.time() - start < 300 and (
        sam.busy or sam.embeddings.get(sam.image_layer, sam.current_plane()) is None
    ):
        pump(app, 1)


def truth(seed, shape_hw, size_px, dtype):
    """Ground-truth labels of a synthetic nuclei sample (as the samples make them)."""
    return make_sample(
        seed, shape_hw=shape_hw, kind="nuclei", bright_objects=True, dtype=dtype, size_px=size_px
    ).labels


def objects(seed, shape_hw, size_px, dtype):
    """Ground-truth objects of a synthetic sample: interior point, box, mask."""
    labels = truth(seed, shape_hw, size_px, dtype)
    out = []
    for i in np.unique(labels)[1:]:
        mask = labels == i
        if mask.sum() < 150:
            continue
        r, c = np.unravel_index(np.argmax(ndi.distance_transform_edt(mask)), mask.shape)
        rows, cols = np.nonzero(mask)
        box = [cols.min() - 3, rows.min() - 3, cols.max() + 3, rows.max() + 3]
        out.append({"point": [int(c), int(r)], "box": [int(v) for v in box], "mask": mask})
    return sorted(out, key=lambda o: -int(o["mask"].sum()))


def iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def finetune_shot(app, out: str, model, name) -> dict:
    """The Fine-tune widget after a short run on four curated slices of the synthetic stack."""
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample("napari-sam-lab", "nuclei_stack")
    image = viewer.layers[-1]
    curated = np.zeros(image.data.shape, dtype=np.uint16)
    for z in range(4):  # the ground truth of four slices stands in for curated labels
        curated[z] = truth(sd.NUCLEI_SEED + z, (256, 256), 12.0, np.uint16)
    labels = viewer.add_labels(curated, name="curated", scale=image.scale, opacity=0.4)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Fine-tune")
    widget.session.set_model(model, name=name or "tiny_vit_b")
    widget._show_model()
    widget.add_pair(image, labels)
    widget.hold_out_check.setChecked(True)
    widget.steps_spin.setValue(60)
    widget.lr_edit.setText("1e-3")
    widget.train()
    start = time.time()
    while widget.running and time.time() - start < 600:
        pump(app, 1)
    viewer.dims.set_current_step(0, 3)  # the held-out slice
    viewer.reset_view()
    pump(app)
    viewer.screenshot(f"{out}/finetune-widget.png", canvas_only=False)
    info = {"finetune": [(r.step, r.loss) for r in widget.records[::10]]}
    viewer.close()
    return info


def automatic_shot(app, out: str, model, name) -> dict:
    """The Automatic segmentation widget after a run on the nuclei sample (demo thresholds)."""
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample("napari-sam-lab", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Automatic segmentation")
    widget.session.set_model(model, name=name or "tiny_vit_b")
    widget._show_model()
    widget.spins["pred_iou_thresh"].setValue(0.6)  # what the demo model needs (README's job)
    widget.spins["stability_score_thresh"].setValue(0.9)
    widget.run()
    start = time.time()
    while widget.worker is not None and time.time() - start < 600:
        pump(app, 1)
    viewer.reset_view()
    pump(app)
    viewer.screenshot(f"{out}/automatic-widget.png", canvas_only=False)
    info = {"automatic": widget.status.text()}
    viewer.close()
    return info


def main(out: str, only: str | None = None) -> None:
    app = QApplication.instance() or QApplication([])
    model, name = best_model()
    if only == "finetune":
        print(json.dumps(finetune_shot(app, out, model, name)))
        return
    if only == "automatic":
        print(json.dumps(automatic_shot(app, out, model, name)))
        return

    def viewer_with(sample):
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 900)
        viewer.open_sample("napari-sam-lab", sample)
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Segment Anything")
        widget.session.set_model(model, name=name)
        widget._fill_models()
        wait(app, widget.session)
        return viewer, widget.session

    def shot(viewer, filename):
        pump(app)
        viewer.reset_view()
        pump(app)
        viewer.screenshot(f"{out}/{filename}", canvas_only=False)
        viewer.close()

    info = {}
    objs = objects(sd.NUCLEI_SEED, (384, 384), 14.0, np.uint8)
    viewer, sam = viewer_with("nuclei")
    result = sam.segment(points_xy=[objs[1]["point"]])
    info["point"] = [result.iou_scores.tolist(), iou(result.masks[0], objs[1]["mask"])]
    shot(viewer, "interactive-points.png")

    viewer, sam = viewer_with("nuclei")
    chosen = objs[2:5]
    result = sam.segment(boxes_xyxy=[o["box"] for o in chosen])
    info["boxes"] = [iou(m, o["mask"]) for m, o in zip(result.masks, chosen, strict=True)]
    shot(viewer, "interactive-boxes.png")

    viewer, sam = viewer_with("nuclei_stack")
    viewer.dims.set_current_step(0, 4)
    wait(app, sam)
    stack_objs = objects(sd.NUCLEI_SEED + 4, (256, 256), 12.0, np.uint16)
    for obj in stack_objs[:4]:
        sam.segment(points_xy=[obj["point"]])
        sam.commit()
    sam.segment(points_xy=[stack_objs[4]["point"]])
    info["stack_ids"] = np.unique(sam.labels_layer.data[4]).tolist()
    shot(viewer, "interactive-stack.png")
    print(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:3])
