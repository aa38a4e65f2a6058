"""Which models the widgets offer, where their weights are, which device and precision (no Qt)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from napari_sam import weights
from napari_sam.data import DEMO_CHECKPOINT

#: Default model of a new session.
DEFAULT_MODEL = "vit_b"

#: Models that are files on this machine, offered (when the file exists)
#: besides the published checkpoints of :data:`napari_sam.weights.KNOWN_CHECKPOINTS`,
#: which all appear automatically: the shipped ones, and fine-tuned ones added
#: with :func:`register_local_model`. Name -> checkpoint file.
LOCAL_MODELS: dict[str, Path] = {"demo": DEMO_CHECKPOINT}

_HINT = (
    " In the Segment Anything widget, choose 'Checkpoint file…' in the model list to use "
    "a file you have, or press Load to try the download again."
)

#: Device choices; ``"auto"`` picks cuda, then mps, then cpu.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

#: Default precision of a new session: bf16 where the hardware makes it fast, else fp32.
DEFAULT_PRECISION = "auto"


@dataclass(frozen=True)
class ModelEntry:
    """One entry of the model list.

    Attributes
    ----------
    name : str
        Name for :func:`napari_sam.weights.load_model`.
    cached : bool
        Whether its weights are on this machine (no download needed).
    note : str
        One line for a tooltip.
    """

    name: str
    cached: bool
    note: str = ""

    @property
    def label(self) -> str:
        """Text for a combo box, e.g. ``"vit_b (cached)"``."""
        return f"{self.name} (cached)" if self.cached else f"{self.name} (download)"


def finetuned_dir() -> Path:
    """Default folder of fine-tuned checkpoints: ``<cache dir>/finetuned``.

    Every ``*.pt`` file there is offered as a model named after the file.
    """
    return weights.cache_dir() / "finetuned"


def local_models() -> dict[str, Path]:
    """Name -> file of every local model: :data:`LOCAL_MODELS`, then :func:`finetuned_dir`'s."""
    folder = finetuned_dir()
    found = {p.stem: p for p in sorted(folder.glob("*.pt"))} if folder.is_dir() else {}
    taken = {*LOCAL_MODELS, *weights.KNOWN_CHECKPOINTS, *weights.PACKAGED_CHECKPOINTS}
    return {**LOCAL_MODELS, **{k: v for k, v in found.items() if k not in taken}}


def check_model_name(name: str) -> str:
    """Return ``name`` if it can name a new local model, else raise ValueError.

    Letters, digits, ``.``, ``_`` and ``-``; not the name of a published,
    packaged or registry model.
    """
    from napari_sam.registry import MODEL_CONFIGS

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"model name must be letters, digits, '.', '_' or '-' (e.g. 'vit_b-nuclei'); "
            f"received {name!r}"
        )
    reserved = {*weights.KNOWN_CHECKPOINTS, *weights.PACKAGED_CHECKPOINTS, *MODEL_CONFIGS}
    if name in reserved:
        raise ValueError(f"model name {name!r} is taken by a built-in model: choose another")
    return name


def register_local_model(name: str, path: str | Path) -> str:
    """Offer checkpoint ``path`` as model ``name`` in the widgets' model lists.

    Parameters
    ----------
    name : str
        New model name (see :func:`check_model_name`); registering a name
        again points it to the new file.
    path : str or Path
        An existing checkpoint file (official SAM layout).

    Returns
    -------
    str
        ``name``.
    """
    check_model_name(name)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"path: no checkpoint file at {str(path)!r}")
    LOCAL_MODELS[name] = path
    return name


def model_names() -> tuple[str, ...]:
    """Every offered model name, the default first, no duplicates."""
    local = [name for name, path in local_models().items() if path.is_file()]
    return tuple(dict.fromkeys([DEFAULT_MODEL, *weights.KNOWN_CHECKPOINTS, *local]))


def is_cached(name: str) -> bool:
    """Whether the weights of ``name`` are present locally (existence only, no hashing)."""
    info = weights.KNOWN_CHECKPOINTS.get(name)
    if info is None:
        return Path(loadable(name)).expanduser().is_file()
    if info.url.startswith("file:"):
        return True
    return (weights.cache_dir() / info.filename).is_file()


def loadable(source: str | Path) -> str | Path:
    """What to pass to :func:`napari_sam.weights.load_model` for ``source``."""
    if isinstance(source, str) and source not in weights.KNOWN_CHECKPOINTS:
        return local_models().get(source, source)
    return source


def model_entries() -> tuple[ModelEntry, ...]:
    """The model list with cache status (what the widget shows)."""
    out = []
    for name in model_names():
        info = weights.KNOWN_CHECKPOINTS.get(name)
        where = "shipped with the package" if name in weights.PACKAGED_CHECKPOINTS else "local"
        note = info.note if info else f"{where} ({loadable(name)})"
        out.append(ModelEntry(name, is_cached(name), note))
    return tuple(out)


def resolve_device(device: str) -> str:
    """Turn a device choice into a torch device string.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "mps"} or a torch device string ("cuda:1")

    Returns
    -------
    str
        ``"auto"`` becomes ``"cuda"``, ``"mps"`` or ``"cpu"``, whichever exists.
    """
    import torch

    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto' or 'cpu'; received {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.split(":")[0] not in DEVICES[1:]:
        raise ValueError(f"device must be one of {DEVICES} (or 'cuda:N'); received {device!r}")
    return device


def describe_source(source: str | Path) -> str:
    """Short human name of a model source (a name or a checkpoint file)."""
    return Path(source).name if isinstance(source, Path) else str(source)


class ModelSlot:
    """The session's model: source, device and precision, loaded lazily, possibly in a worker.

    ``token`` (the model's generation) bumps on every change, so work started
    with an older model, device or precision is recognised and dropped.

    Parameters
    ----------
    source : str or Path
        Model name or checkpoint file.
    device : str
        A :data:`DEVICES` choice.
    precision : str, optional
        A :data:`napari_sam.precision.PRECISIONS` choice for the embeddings
        (default :data:`DEFAULT_PRECISION`).
    on_change : callable
        Called with no argument after every change of model, source, device or precision.
    on_status, on_error : callable
        Called with a message (``on_error`` when a load fails).
    """

    def __init__(
        self, source, device, *, precision=DEFAULT_PRECISION, on_change, on_status, on_error
    ) -> None:
        from napari_sam.precision import check_precision  # torch, imported on first use

        resolve_device(device)
        self.source: str | Path = source
        self.device = device
        self.precision: str = check_precision(precision)
        self.model = None
        self.token = 0
        self.error: str | None = None
        self.job = None
        self._on_change, self._on_status, self._on_error = on_change, on_status, on_error

    @property
    def name(self) -> str:
        """Short name of the source."""
        return describe_source(self.source)

    @property
    def is_local(self) -> bool:
        """Whether loading needs no download."""
        return self.model is not None or isinstance(self.source, Path) or is_cached(self.source)

    def _changed(self) -> None:
        self.token += 1
        self.error = None
        self._on_change()

    def set_model(self, model, *, name: str | None = None) -> None:
        """Use an already built model."""
        self.model, self.source = model, name or model.config.name
        self._changed()

    def set_source(self, source: str | Path) -> None:
        """Choose a model by name or file (dropped now, loaded when needed)."""
        if isinstance(source, Path):
            source = source.expanduser()
        if source == self.source and (self.model is not None or self.job is not None):
            return
        self.model, self.source = None, source
        self._changed()

    def set_device(self, device: str) -> None:
        """Choose a device; a loaded model moves there."""
        resolved = resolve_device(device)
        self.device = device
        if self.model is not None:
            self.model = self.model.to(resolved)
        self._changed()

    def set_precision(self, precision: str) -> None:
        """Choose the precision of new embeddings (those of another precision are not reused).

        Parameters
        ----------
        precision : {"auto", "exact", "fp32", "bf16", "fp16"}
            See :mod:`napari_sam.precision`; choosing the current one changes nothing.
        """
        from napari_sam.precision import check_precision

        check_precision(precision)
        if precision == self.precision:
            return
        self.precision = precision
        self._changed()

    def ensure(self):
        """Load the model in this thread if needed (downloads) and return it."""
        if self.model is None:
            token = self.token
            model = weights.load_model(loadable(self.source), device=resolve_device(self.device))
            if token == self.token:
                self.model = model
        return self.model

    def load_here(self) -> None:
        """Load in this thread; a failure is reported through ``on_error``, not raised."""
        if self.error is not None:
            return
        try:
            self.ensure()
        except (weights.CheckpointError, ValueError, OSError, RuntimeError) as exc:
            self.error = f"Could not load model {self.name}: {exc}{_HINT}"
            self._on_error(self.error)

    def start_load(self, on_ready) -> None:
        """Load in a worker (download with a progress bar); ``on_ready()`` on success."""
        from . import _workers

        if self.job is not None or self.error is not None or self.model is not None:
            return
        name, token, source = self.name, self.token, loadable(self.source)
        device = resolve_device(self.device)
        self._on_status(f"Loading model {name}…")

        def on_update(done: int, total: int | None) -> None:
            size = "?" if total is None else f"{total / 2**20:.0f}"
            self._on_status(f"Downloading {name}: {done / 2**20:.0f} of {size} MB")

        progress = _workers.DownloadProgress(f"Downloading {name}", on_update=on_update)

        def done(model) -> None:
            self.job = None
            progress.close()
            if token == self.token:
                self.model = model
                self._on_status(f"Model {name} ready")
                on_ready()

        def failed(exc: BaseException) -> None:
            self.job = None
            progress.close()
            if token == self.token:
                self.error = f"Could not load model {name}: {exc}{_HINT}"
                self._on_error(self.error)

        self.job = _workers.start_worker(
            lambda: _load_and_warm(source, device, progress),
            desc=f"Loading {name}",
            on_returned=done,
            on_errored=failed,
        )


def _load_and_warm(source, device: str, progress) -> object:
    """The worker's job: load the model, then warm what the first preview needs.

    napari's first Labels layer of a process builds its colormap through
    ``label_colormap``, which imports ``skimage.color`` and ``scipy.linalg``
    (about 0.3 s); done here, in the worker, the first click does not wait
    for it (0.54 -> 0.31 s for the first preview on the demo model).
    """
    model = weights.load_model(source, device=device, progress=progress)
    from napari.utils.colormaps import label_colormap

    label_colormap()
    return model
