"""Shared fixtures: a network guard, small real architectures with random weights, real data.

The SAM and CLIP used here are segment_anything's `Sam` and an open_clip `CLIP`
built from small configurations: the code paths are the real ones, the numbers
are not. LiteMedSAM runs with its real weights.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import ipaddress
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.models.weights import file_sha256

from tiny_models import TINY_CLIP, TINY_SAM, TINY_SAM_PROPOSALS, build_tiny_sam  # noqa: F401 (re-exported)
from tiny_models import register as register_tiny_models

torch.set_num_threads(2)

TINY_MODELS_PLUGIN = Path(__file__).with_name("tiny_models.py")
CRASHING_MODEL_PLUGIN = Path(__file__).with_name("crashing_model.py")


# -- no network --------------------------------------------------------------------------


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    if isinstance(address, (tuple, list)) and address:
        host = address[0]
    else:
        return True  # AF_UNIX paths and the like never leave the machine
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already use the network


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Fail any test that opens a connection to anything but this machine."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real, sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkBlocked(f"test tried to reach {address}: tests must not use the network")
        return real(sock, address)

    socket.socket.connect = lambda s, a: guarded(real_connect, s, a)
    socket.socket.connect_ex = lambda s, a: guarded(real_connect_ex, s, a)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost") and not _is_loopback((host,)):
            raise NetworkBlocked(f"test tried to resolve {host}: tests must not use the network")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    yield
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (
        real_connect, real_connect_ex, real_getaddrinfo)


@pytest.fixture(autouse=True)
def isolated_model_folders(tmp_path, monkeypatch):
    """Every test gets an empty weights cache and no model directory from the environment."""
    monkeypatch.setenv("SALIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SALIP_MODEL_DIR", raising=False)
    monkeypatch.delenv("SALIP_OFFLINE", raising=False)


# -- a local file server ---------------------------------------------------------------------

PAYLOAD = b"not really weights, but bytes with a known digest" * 1000
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server(tmp_path):
    """A file server on 127.0.0.1 serving tmp_path/served (good.pth is PAYLOAD);
    /broken.pth sends half and hangs up; /slow.pth trickles PAYLOAD out in small chunks;
    /moved.pth redirects to good.pth on 127.0.0.1, /elsewhere.pth to good.pth on "localhost";
    /stall.pth sends half of PAYLOAD, then waits (until the test ends) before the rest."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "good.pth").write_bytes(PAYLOAD)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            port = self.server.server_address[1]
            redirects = {"/moved.pth": f"http://127.0.0.1:{port}/good.pth",  # same host: followed
                         "/elsewhere.pth": f"http://localhost:{port}/good.pth"}  # another host name: refused
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
                return
            if self.path == "/slow.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                for start in range(0, len(PAYLOAD), 4096):
                    self.wfile.write(PAYLOAD[start : start + 4096])
                    self.wfile.flush()
                    time.sleep(0.01)
                return
            if self.path == "/stall.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                if self.server.release.wait(60):
                    return  # the test is over: hang up, the rest never comes
                self.wfile.write(PAYLOAD[len(PAYLOAD) // 2 :])
                return
            if self.path == "/broken.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


# -- small real architectures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_sam(tiny_sam_checkpoint) -> str:
    """The tiny SAM's name, registered with its checkpoint's SHA256 so that a wrong file is refused."""
    register_tiny_models(file_sha256(tiny_sam_checkpoint))
    return TINY_SAM


@pytest.fixture(scope="session")
def tiny_clip_config() -> str:
    """The name of the open_clip config (ViT 2 layers, text 2 layers) that tiny_models registers."""
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tiny_clip_config, tmp_path_factory) -> Path:
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(tiny_clip_config, pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_option(tiny_clip_config, tiny_clip_checkpoint) -> str:
    """The --clip value that selects the tiny CLIP with its local checkpoint."""
    return f"{tiny_clip_config}:{tiny_clip_checkpoint}"


# -- real data ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mni152():
    """The real MNI152 T1 template (from nilearn's wheel) and nilearn's brain mask of it."""
    import SimpleITK as sitk

    from SaLIPSegmentLib.sample_data import mni152_brain_mask, mni152_t1_path

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(mni152_t1_path())))
    return array, mni152_brain_mask(array)


def disk_image(size=64, center=(30, 36), radius=14, value=200, background=20) -> np.ndarray:
    """A bright disk on a dark background: a simple, known target."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), background, dtype=np.uint8)
    image[(yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2] = value
    return image


@pytest.fixture
def sigint_reaches_children():
    """Child processes started in the test take SIGINT as a terminal's Ctrl-C. A test run started as a
    background job (`make test &`) has SIGINT ignored, and children inherit an ignored signal through
    exec, so a test's interrupt would never land; a handled one is reset to the default instead."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
