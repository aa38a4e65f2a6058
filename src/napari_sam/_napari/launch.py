"""Open napari with a sample image and the Segment Anything widget (one command).

``python -m napari_sam._napari.launch [SAMPLE] [--model NAME]``, where
SAMPLE is one of this plugin's sample keys (``nuclei``, ``nuclei_stack``,
``cell``, ``coins``; default ``nuclei``).
"""

from __future__ import annotations

import argparse

SAMPLES = ("nuclei", "nuclei_stack", "cell", "coins")


def open_viewer(sample: str | None = "nuclei", *, model: str | None = None):
    """A napari viewer showing ``sample`` with the interactive widget docked.

    Parameters
    ----------
    sample : str or None
        Sample key of this plugin, or None for an empty viewer.
    model : str, optional
        Model name or checkpoint path for the session (default: the widget's).

    Returns
    -------
    napari.Viewer
    """
    import napari

    if sample is not None and sample not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES} or None; received {sample!r}")
    viewer = napari.Viewer()
    if sample is not None:
        viewer.open_sample("napari-sam-lab", sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-lab", "Segment Anything")
    if model is not None:
        widget.session.set_model_source(model)
        widget._fill_models()
    return viewer


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample", nargs="?", default="nuclei", choices=SAMPLES)
    parser.add_argument("--model", default=None, help="model name or checkpoint file")
    args = parser.parse_args(argv)
    import napari

    open_viewer(args.sample, model=args.model)
    napari.run()


if __name__ == "__main__":
    main()
