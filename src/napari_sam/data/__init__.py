"""Data files shipped with the package.

``DEMO_CHECKPOINT`` holds the weights of the ``demo`` model (registry config
``"demo"``): a small SAM-architecture model trained from scratch on synthetic
fluorescence images by ``scripts/train_demo.py``; see ``docs/demo-model.md``.
Floating-point tensors are stored in float16; ``load_state_dict`` upcasts.
"""

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "demo_sam.pt"
