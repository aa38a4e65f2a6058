"""Packaging promises: the manifest is found (editable and wheel), the core stays GUI-free."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_link_points_at_root_file():
    link = ROOT / "src" / "napari_sam" / "napari.yaml"
    assert link.is_symlink(), "src/napari_sam/napari.yaml must link to the root manifest"
    assert link.resolve() == (ROOT / "napari.yaml").resolve()


def test_installed_manifest_validates():
    """The installed distribution (editable here) exposes a valid manifest."""
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-sam-lab")
    assert manifest.name == "napari-sam-lab"
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-sam-lab", "--imports"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_ships_manifest_that_validates(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_sam_lab-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_sam/napari.yaml" in names
        shipped = yaml.safe_load(zf.read("napari_sam/napari.yaml"))
        zf.extractall(tmp_path / "site")
    assert shipped == yaml.safe_load((ROOT / "napari.yaml").read_text())
    # The unpacked wheel comes first on sys.path, so npe2 finds ITS metadata and manifest.
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as md, napari_sam; "
            "print(md.distribution('napari-sam-lab').locate_file('')); print(napari_sam.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-sam-lab", "--imports"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_without_gui_modules():
    """Nothing outside napari_sam._napari imports napari, qtpy or magicgui."""
    blocked = ["napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6"]
    modules = [
        "napari_sam",
        "napari_sam.registry",
        "napari_sam.weights",
        "napari_sam.image",
        "napari_sam.predict",
        "napari_sam.labels",
        "napari_sam.automatic",
        "napari_sam.text",
        "napari_sam.training",
        "napari_sam.synthetic",
        "napari_sam.models.sam",
    ]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        "import importlib, pathlib\n"
        f"for mod in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(mod)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name and exc.name.startswith('napari_sam'):\n"
        "            continue  # module not written yet\n"
        "        raise\n"
        "import napari_sam\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{blocked!r} and sys.modules[m] is not None))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
