"""Checkpoints: cache, verified atomic downloads from a loopback server, safe loading."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from napari_sam import weights
from napari_sam.registry import MODEL_CONFIGS, build_model
from napari_sam.weights import (
    KNOWN_CHECKPOINTS,
    ArchitectureMismatchError,
    CheckpointFormatError,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointUnavailableError,
    CheckpointVerificationError,
    UnknownArchitectureError,
    cache_dir,
    fetch_checkpoint,
    infer_config,
    load_model,
    load_state_dict_into,
    read_state_dict,
)

PAYLOAD = bytes(range(256)) * 1200  # 307,200 bytes: several chunks of 64 KiB


# --- loopback HTTP server ----------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server.root``; ``/cut/<n>/<file>`` sends n bytes then hangs up."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        parts = self.path.strip("/").split("/")
        if parts[0] == "cut":
            data = (Path(self.server.root) / parts[2]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: int(parts[1])])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def translate_path(self, path):
        return str(Path(self.server.root) / path.lstrip("/").split("?")[0])


@pytest.fixture
def server(tmp_path):
    """A loopback-only HTTP server over ``tmp_path / "www"``; yields (base_url, server)."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.requests = root, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def closed_port_url():
    """A loopback URL nobody listens on: connection refused, like being offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/sam.pth"


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(weights, "_CHUNK_BYTES", 64 * 1024)


def _register(monkeypatch, url, content, **overrides):
    """Register checkpoint "fake" (config tiny_vit_b) at ``url`` for ``content``."""
    fields = {
        "name": "fake",
        "config": "tiny_vit_b",
        "url": url,
        "filename": "fake_ckpt.pth",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
    }
    fields.update(overrides)
    info = CheckpointInfo(**fields)
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "fake", info)
    return info


def _cache_files():
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().exists() else []


# --- catalogue and cache directory -----------------------------------------------


def test_known_checkpoints_catalogue():
    assert set(KNOWN_CHECKPOINTS) == {"vit_b", "vit_l", "vit_h", "vit_t"}
    vit_b = KNOWN_CHECKPOINTS["vit_b"]
    assert vit_b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert vit_b.size == 375_042_383
    assert vit_b.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert KNOWN_CHECKPOINTS["vit_t"].sha256 is None
    for name, info in KNOWN_CHECKPOINTS.items():
        assert info.name == name and info.config in MODEL_CONFIGS
        assert info.url.endswith(info.filename)
        assert info.sha256 is None or len(info.sha256) == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        vit_b.size = 1


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.setenv("NAPARI_SAM_CACHE", "")
    import platformdirs

    expected = Path(platformdirs.user_cache_dir("napari-sam-lab")) / "checkpoints"
    assert cache_dir() == expected


# --- downloads -----------------------------------------------------------------


def test_download_success_lands_in_cache_with_progress(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)
    calls, during = [], set()

    def progress(done, total):
        calls.append((done, total))
        during.update(p.name for p in cache_dir().iterdir())

    path = fetch_checkpoint("fake", progress=progress)
    assert path == cache_dir() / "fake_ckpt.pth"
    # Streamed to a temporary file in the cache, renamed into place at the end.
    assert "fake_ckpt.pth" not in during
    assert any(n.startswith(".fake_ckpt.pth.") and n.endswith(".part") for n in during)
    assert path.read_bytes() == PAYLOAD
    assert calls[0] == (0, len(PAYLOAD)) and calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    done = [d for d, _ in calls]
    assert len(calls) >= 5 and done == sorted(done)
    assert _cache_files() == ["fake_ckpt.pth", "fake_ckpt.pth.verified"]


def test_download_explicit_cache_dir(server, monkeypatch, tmp_path):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)
    path = fetch_checkpoint("fake", cache_dir=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "fake_ckpt.pth"
    assert _cache_files() == []


def test_hash_mismatch_leaves_nothing(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD, sha256="0" * 64)
    with pytest.raises(CheckpointVerificationError, match="sha256") as info:
        fetch_checkpoint("fake")
    assert f"{base}/ok.pth" in str(info.value) and "0" * 64 in str(info.value)
    assert _cache_files() == []


def test_truncated_file_on_server_is_refused(server, monkeypatch):
    base, httpd = server
    (httpd.root / "short.pth").write_bytes(PAYLOAD[:1000])
    _register(monkeypatch, f"{base}/short.pth", PAYLOAD)
    with pytest.raises(CheckpointVerificationError, match="1,000 bytes"):
        fetch_checkpoint("fake")
    # Without a known size the hash still catches it.
    _register(monkeypatch, f"{base}/short.pth", PAYLOAD, size=None)
    with pytest.raises(CheckpointVerificationError, match="sha256"):
        fetch_checkpoint("fake")
    assert _cache_files() == []


def test_interrupted_download_leaves_no_partial_file(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/cut/100000/ok.pth", PAYLOAD)
    calls = []
    with pytest.raises(CheckpointUnavailableError, match=r"fake_ckpt\.pth") as info:
        fetch_checkpoint("fake", progress=lambda d, t: calls.append(d))
    msg = str(info.value)
    # Python's http.client reports the cut either as a short body or as IncompleteRead.
    assert "closed after 100,000 of 307,200 bytes" in msg or "IncompleteRead" in msg
    assert 0 < calls[-1] <= 100_000
    assert _cache_files() == []


def test_cancelled_download_leaves_no_partial_file(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)

    def cancel(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch_checkpoint("fake", progress=cancel)
    assert _cache_files() == []


def test_http_404_message(server, monkeypatch):
    base, _ = server
    _register(monkeypatch, f"{base}/missing.pth", PAYLOAD)
    with pytest.raises(CheckpointUnavailableError) as info:
        fetch_checkpoint("fake")
    msg = str(info.value)
    assert "HTTP 404" in msg and f"{base}/missing.pth" in msg
    assert str(cache_dir() / "fake_ckpt.pth") in msg and "load_model(" in msg
    assert f"{len(PAYLOAD):,} bytes" in msg
    assert _cache_files() == []


def test_offline_message_names_url_file_and_cache(monkeypatch, closed_port_url):
    _register(monkeypatch, closed_port_url, PAYLOAD)
    with pytest.raises(CheckpointUnavailableError) as info:
        fetch_checkpoint("fake")
    msg = str(info.value)
    assert closed_port_url in msg and "fake_ckpt.pth" in msg
    assert str(cache_dir()) in msg and "NAPARI_SAM_CACHE" in msg
    assert "path of a local checkpoint" in msg


def test_download_false_never_touches_network(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)
    with pytest.raises(CheckpointUnavailableError, match=r"download=False") as info:
        fetch_checkpoint("fake", download=False)
    assert f"{base}/ok.pth" in str(info.value) and str(cache_dir()) in str(info.value)
    assert httpd.requests == []


def test_cached_file_reused_without_network_or_rehash(server, monkeypatch, closed_port_url):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)
    first = fetch_checkpoint("fake")
    _register(monkeypatch, closed_port_url, PAYLOAD)  # the network is gone now

    def no_hashing(path):
        raise AssertionError("a verified cached file must not be hashed again")

    monkeypatch.setattr(weights, "_file_sha256", no_hashing)
    assert fetch_checkpoint("fake") == first
    assert fetch_checkpoint("fake", download=False) == first
    assert len(httpd.requests) == 1


def test_manually_copied_file_verified_once(monkeypatch, closed_port_url):
    _register(monkeypatch, closed_port_url, PAYLOAD)
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "fake_ckpt.pth").write_bytes(PAYLOAD)
    assert fetch_checkpoint("fake", download=False) == cache_dir() / "fake_ckpt.pth"
    assert (cache_dir() / "fake_ckpt.pth.verified").is_file()


def test_corrupted_cached_file_detected_and_replaced(server, monkeypatch):
    base, httpd = server
    (httpd.root / "ok.pth").write_bytes(PAYLOAD)
    _register(monkeypatch, f"{base}/ok.pth", PAYLOAD)
    path = fetch_checkpoint("fake")
    path.write_bytes(PAYLOAD[::-1])  # same size, other bytes, new mtime
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointVerificationError, match="sha256"):
        fetch_checkpoint("fake", download=False)
    with pytest.warns(UserWarning, match="fails verification"):
        assert fetch_checkpoint("fake") == path
    assert path.read_bytes() == PAYLOAD


# --- local paths and file contents ---------------------------------------------


def test_local_path_accepted_as_str_and_path(tmp_path):
    f = tmp_path / "my weights.pt"
    f.write_bytes(b"anything")
    assert fetch_checkpoint(str(f)) == f
    assert fetch_checkpoint(f, download=False) == f


def test_missing_path_or_unknown_name():
    with pytest.raises(CheckpointNotFoundError, match=r"vit_b, vit_h, vit_l, vit_t"):
        fetch_checkpoint("no/such/file.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict("no/such/file.pth")
    with pytest.raises(TypeError, match="name_or_path"):
        fetch_checkpoint(42)


def _plain_state():
    return {"image_encoder.pos_embed": torch.arange(6.0).view(1, 1, 2, 3), "x.bias": torch.ones(2)}


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_plain_and_legacy_state_dicts(tmp_path):
    state = _plain_state()
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(tmp_path / "zip.pt"), state)
    _assert_same(read_state_dict(tmp_path / "legacy.pt"), state)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state"])
def test_wrapped_state_dicts(tmp_path, wrapper):
    state = _plain_state()
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "w.pt")
    _assert_same(read_state_dict(tmp_path / "w.pt"), state)


def test_micro_sam_training_checkpoint(tmp_path):
    state = _plain_state()
    torch.save(
        {
            "model_state": {f"sam.{k}": v for k, v in state.items()},
            "decoder_state": {"base.weight": torch.zeros(3)},
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]},
            "epoch": 7,
        },
        tmp_path / "best.pt",
    )
    _assert_same(read_state_dict(tmp_path / "best.pt"), state)


@pytest.mark.parametrize(
    "text",
    [
        b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>",
        b"\n  <html><head><title>Error</title></head></html>",
    ],
)
def test_html_page_refused(tmp_path, text):
    (tmp_path / "page.pth").write_bytes(text)
    with pytest.raises(CheckpointFormatError, match="HTML page") as info:
        read_state_dict(tmp_path / "page.pth")
    assert info.value.reason == "html" and "page.pth" in str(info.value)


def test_git_lfs_pointer_refused(tmp_path):
    (tmp_path / "m.pt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 40728226\n"
    )
    with pytest.raises(CheckpointFormatError, match="git lfs pull") as info:
        read_state_dict(tmp_path / "m.pt")
    assert info.value.reason == "lfs_pointer"


class _RunsCode:
    """Pickles to a call of ``os.makedirs(marker)``: harmless, but visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_needing_code_execution_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(2), "evil": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointFormatError, match="code execution") as info:
        read_state_dict(tmp_path / "evil.pt")
    assert info.value.reason == "unsafe_pickle"
    assert "makedirs" in str(info.value) and "weights_only=True" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_torch_file_refused(tmp_path, legacy, keep):
    torch.save(
        {"w": torch.zeros(4000)}, tmp_path / "full.pt", _use_new_zipfile_serialization=not legacy
    )
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        read_state_dict(tmp_path / "cut.pt")
    assert info.value.reason == "truncated"


def test_empty_file_refused(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty") as info:
        read_state_dict(tmp_path / "empty.pt")
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.zeros(1)], "holds a list"),
        ({"w": torch.zeros(1), "step": 3}, "not tensors: \\['step'\\]"),
        ({}, "no entries"),
    ],
)
def test_not_a_state_dict_refused(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointFormatError, match=match) as info:
        read_state_dict(tmp_path / "x.pt")
    assert info.value.reason == "not_state_dict"


# --- architectures (tiny models) ------------------------------------------------


def _meta_state(name):
    """Key/shape-faithful state dict of a registered config, built without memory."""
    from napari_sam.models.sam import build_sam

    with torch.device("meta"):
        return build_sam(MODEL_CONFIGS[name]).state_dict()


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_infer_config_every_registered_config(name):
    assert infer_config(_meta_state(name)).name == name


def test_infer_config_real_tiny_models(tiny_model):
    assert infer_config(tiny_model.state_dict()) is MODEL_CONFIGS["tiny_vit_b"]
    assert infer_config(build_model("tiny_vit_t").state_dict()).name == "tiny_vit_t"


def test_infer_config_unknown_architecture():
    state = _meta_state("tiny_vit_b")
    extra = {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items() if "blocks.1." in k}
    with pytest.raises(UnknownArchitectureError, match=r"Closest is 'tiny_vit_b'.*depth: file 3"):
        infer_config({**state, **extra}, source="f.pt")
    with pytest.raises(UnknownArchitectureError, match="not a SAM state dict"):
        infer_config({"fc.weight": torch.zeros(2, 2)})


def test_wrong_architecture_lists_keys_and_suggests(tiny_model):
    other = build_model("tiny_vit_t").state_dict()
    with pytest.raises(ArchitectureMismatchError) as info:
        load_state_dict_into(tiny_model, other, source="mobile.pt")
    err, msg = info.value, str(info.value)
    assert err.missing and err.unexpected and err.suggestion == "tiny_vit_t"
    assert "image_encoder.blocks.0.attn.qkv.weight" in err.missing
    assert "image_encoder.layers.0.blocks.0.conv1.c.weight" in err.unexpected
    assert f"{len(err.missing)} missing keys" in msg and f"{len(err.unexpected)} unexpected" in msg
    assert f"({len(err.missing) - 10} more)" in msg
    assert "mobile.pt" in msg and "looks like a 'tiny_vit_t' checkpoint" in msg


def test_shape_mismatch_reported(tiny_model):
    state = dict(tiny_model.state_dict())
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(ArchitectureMismatchError, match=r"1 shape mismatches") as info:
        load_state_dict_into(tiny_model, state, source="x.pt")
    assert info.value.mismatched == (("mask_decoder.iou_token.weight", (1, 7), (1, 32)),)
    assert not info.value.missing and not info.value.unexpected


def _params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_from_micro_sam_style_file(tiny_model, tmp_path):
    wrapped = {
        "model_state": {f"sam.{k}": v for k, v in tiny_model.state_dict().items()},
        "decoder_state": {"decoder.weight": torch.zeros(2)},
    }
    torch.save(wrapped, tmp_path / "finetuned.pt")
    model = load_model(tmp_path / "finetuned.pt")
    assert model.config.name == "tiny_vit_b" and not model.training
    assert _params_equal(model, tiny_model)


def test_load_model_registry_name_without_checkpoint():
    with pytest.raises(ValueError, match=r"build_model\('tiny_vit_b'\)"):
        load_model("tiny_vit_b")


def test_load_model_known_name_via_loopback(server, monkeypatch, tiny_model):
    base, httpd = server
    torch.save(tiny_model.state_dict(), httpd.root / "tiny.pth")
    content = (httpd.root / "tiny.pth").read_bytes()
    _register(monkeypatch, f"{base}/tiny.pth", content)
    model = load_model("fake")
    assert _params_equal(model, tiny_model)


def test_unknown_hash_checkpoint_verified_by_loading(server, monkeypatch, tiny_model):
    base, httpd = server
    torch.save(tiny_model.state_dict(), httpd.root / "tiny.pth")
    torch.save(build_model("tiny_vit_t").state_dict(), httpd.root / "other.pth")
    (httpd.root / "page.html").write_text("<!DOCTYPE html><html>rate limited</html>")
    _register(monkeypatch, f"{base}/page.html", b"", sha256=None, size=None)
    with pytest.raises(CheckpointVerificationError, match="HTML page"):
        fetch_checkpoint("fake")
    _register(monkeypatch, f"{base}/other.pth", b"", sha256=None, size=None)
    with pytest.raises(CheckpointVerificationError, match="holds a 'tiny_vit_t' model"):
        fetch_checkpoint("fake")
    assert _cache_files() == []
    _register(monkeypatch, f"{base}/tiny.pth", b"", sha256=None, size=None)
    assert _params_equal(load_model("fake"), tiny_model)


def test_build_model_with_checkpoint_path(tiny_model, tmp_path):
    torch.save({"state_dict": tiny_model.state_dict()}, tmp_path / "w.pth")
    assert _params_equal(build_model("tiny_vit_b", checkpoint=tmp_path / "w.pth"), tiny_model)
    with pytest.raises(ArchitectureMismatchError, match="looks like a 'tiny_vit_b'"):
        build_model("tiny_vit_t", checkpoint=tmp_path / "w.pth")


def test_reference_mobile_sam_file_loads_as_vit_t(tmp_path):
    """A file written by the reference MobileSAM package (test oracle) loads by path."""
    from ._reference import build_reference, randomize_

    reference = randomize_(build_reference(MODEL_CONFIGS["vit_t"]), seed=1)
    torch.save(reference.state_dict(), tmp_path / "mobile_sam.pt")
    model = load_model(tmp_path / "mobile_sam.pt")
    assert model.config.name == "vit_t"
    assert _params_equal(model, reference)
