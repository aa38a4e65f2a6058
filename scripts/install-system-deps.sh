#!/usr/bin/env bash
# Debian 12 packages for napari under Xvfb (Mesa GL, the xcb and xkbcommon libraries Qt 6 needs).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    xvfb xauth libgl1 libglx-mesa0 libgl1-mesa-dri libegl1 libopengl0 libdbus-1-3 \
    libfontconfig1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 \
    libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 \
    libxcb-xinerama0 libxcb-xinput0
