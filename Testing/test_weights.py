"""Weights: resolution order, SHA256, atomic download from a local server, offline message."""

import pickle
import shutil
import socket
import urllib.parse

import pytest
import torch

from SaLIPSegmentLib.cli import main
from SaLIPSegmentLib.errors import ChecksumError, MissingWeightsError, ModelError
from SaLIPSegmentLib.models import create_segmenter, weights
from SaLIPSegmentLib.models.registry import LISTED_CLIP, SEGMENTERS, weights_for
from SaLIPSegmentLib.models.weights import UntrustedRedirect, WeightsFile

from conftest import DIGEST, PAYLOAD, NetworkBlocked


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_lands_in_the_cache_verified(server):
    spec = WeightsFile("good.pth", url=f"{server}/good.pth", sha256=DIGEST)
    path = weights.resolve(spec, progress=False)
    assert path == weights.cache_dir() / "good.pth" and path.read_bytes() == PAYLOAD
    assert weights.resolve(spec, download=False) == path  # found in the cache next time


def test_checksum_mismatch_on_download_leaves_nothing(server):
    spec = WeightsFile("good.pth", url=f"{server}/good.pth", sha256="0" * 64)
    with pytest.raises(ChecksumError, match="discarded"):
        weights.resolve(spec, progress=False)
    assert _files(weights.cache_dir()) == []


def test_interrupted_download_leaves_no_partial_file(server):
    spec = WeightsFile("broken.pth", url=f"{server}/broken.pth", sha256=DIGEST)
    with pytest.raises(MissingWeightsError):
        weights.resolve(spec, progress=False)
    assert _files(weights.cache_dir()) == []


def test_redirects_are_followed_only_within_the_official_host(server):
    moved = WeightsFile("moved.pth", url=f"{server}/moved.pth", sha256=DIGEST)
    assert weights.resolve(moved, progress=False).read_bytes() == PAYLOAD
    elsewhere = WeightsFile("elsewhere.pth", url=f"{server}/elsewhere.pth", sha256=DIGEST)
    with pytest.raises(UntrustedRedirect, match="not the official host 127.0.0.1"):
        weights.resolve(elsewhere, progress=False)
    assert _files(weights.cache_dir()) == ["moved.pth"]


def test_every_registered_download_is_https_from_an_official_host():
    official = {"dl.fbaipublicfiles.com", "openaipublic.azureedge.net"}
    urls = [spec.weights.url for spec in SEGMENTERS.values() if spec.weights.url]
    urls += [weights_for(name).url for name in LISTED_CLIP]
    assert len(urls) >= 6
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https" and parts.hostname in official, url


def test_a_read_only_model_directory_is_only_read(tmp_path, monkeypatch, tiny_sam, tiny_sam_checkpoint):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    shutil.copy(tiny_sam_checkpoint, model_dir / "tiny_sam.pth")
    (model_dir / "tiny_sam.pth").chmod(0o444)
    model_dir.chmod(0o555)
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SALIP_CACHE_DIR", str(blocker / "cache"))  # no cache can exist: nothing may need one
    monkeypatch.setenv("SALIP_MODEL_DIR", str(model_dir))
    try:
        segmenter = create_segmenter(tiny_sam, torch.device("cpu"))
        assert segmenter is not None
        assert main(["models", "verify", tiny_sam]) == 0
        assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    finally:
        model_dir.chmod(0o755)


def test_a_corrupt_local_file_is_refused(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(PAYLOAD + b"!")
    spec = WeightsFile("model.pth", url=None, sha256=DIGEST)
    with pytest.raises(ChecksumError, match="does not match"):
        weights.resolve(spec, path=bad)
    with pytest.raises(ChecksumError):
        weights.resolve(spec, explicit_dir=tmp_path)


def test_model_dir_comes_before_the_cache(tmp_path, monkeypatch):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "m.pth").write_bytes(PAYLOAD)
    spec = WeightsFile("m.pth", url="http://127.0.0.1:9/m.pth", sha256=DIGEST)
    assert weights.resolve(spec, explicit_dir=model_dir, download=False) == model_dir / "m.pth"
    monkeypatch.setenv("SALIP_MODEL_DIR", str(model_dir))
    assert weights.resolve(spec, download=False) == model_dir / "m.pth"


def test_offline_message_names_the_file_its_url_and_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SALIP_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as error:
        create_segmenter("vit_b", model_dir=tmp_path / "models")
    message = str(error.value)
    assert "sam_vit_b_01ec64.pth" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert str(tmp_path / "models" / "sam_vit_b_01ec64.pth") in message


def test_an_unreachable_host_gives_the_same_clear_error():
    # Port 9 (discard) on loopback is closed here: the refusal an offline machine gets.
    spec = WeightsFile("x.pth", url="http://127.0.0.1:9/x.pth", sha256=DIGEST)
    with pytest.raises(MissingWeightsError, match="Download it from"):
        weights.resolve(spec, progress=False)


def test_the_guard_blocks_non_loopback_connections():
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("10.255.255.1", 80), timeout=1)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return {}


def test_checkpoints_are_loaded_without_running_pickled_code(tiny_sam, tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump(_Payload(), handle)
    spec_sha = weights.file_sha256(evil)
    from SaLIPSegmentLib.models import get_segmenter_spec, register_segmenter

    spec = get_segmenter_spec(tiny_sam)
    register_segmenter(spec.__class__(**{**spec.__dict__, "name": "evil-sam",
                                         "weights": WeightsFile("evil.pth", None, spec_sha)}))
    with pytest.raises(ModelError, match="plain state dict"):
        create_segmenter("evil-sam", torch.device("cpu"), evil)
    assert _Payload.ran is False


def test_remove_partials_takes_only_the_named_process_files(tmp_path):
    """The panel cleans up after the download process it killed, never after another download."""
    folder = tmp_path / "cache"
    folder.mkdir()
    mine = folder / (weights.partial_prefix("sam.pth", 4242) + "abc" + weights.PARTIAL_SUFFIX)
    other = folder / (weights.partial_prefix("sam.pth", 4243) + "def" + weights.PARTIAL_SUFFIX)
    for path in (mine, other, folder / "sam.pth"):
        path.write_bytes(b"x")
    assert weights.remove_partials("sam.pth", 4242, folder) == [mine]
    assert sorted(path.name for path in folder.iterdir()) == sorted([other.name, "sam.pth"])
    assert weights.remove_partials("sam.pth", 4242, tmp_path / "absent") == []
