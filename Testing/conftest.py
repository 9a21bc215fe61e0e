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
import json
import socket
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.models import SegmenterSpec, register_segmenter
from SaLIPSegmentLib.models.registry import load_weights_file
from SaLIPSegmentLib.models.sam import SamSegmenter
from SaLIPSegmentLib.models.weights import WeightsFile, file_sha256

torch.set_num_threads(2)

TINY_SAM = "tiny-sam"
TINY_CLIP = "salip-test-tiny-clip"
# Random weights predict arbitrary IoUs, so nothing may be filtered on them.
TINY_SAM_PROPOSALS = {"points_per_side": 4, "points_per_batch": 16, "pred_iou_thresh": -1e9,
                      "stability_score_thresh": -1e9, "max_area_fraction": 1.0}


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
    /broken.pth sends half and hangs up; /slow.pth trickles PAYLOAD out in small chunks."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "good.pth").write_bytes(PAYLOAD)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.pth":
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                for start in range(0, len(PAYLOAD), 4096):
                    self.wfile.write(PAYLOAD[start : start + 4096])
                    self.wfile.flush()
                    time.sleep(0.01)
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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# -- small real architectures ------------------------------------------------------------------


def build_tiny_sam():
    """segment_anything's real Sam with a 2-block ViT on 128 px input."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed = 32
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=embed, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=embed, image_embedding_size=(8, 8),
                                     input_image_size=(128, 128), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=64, num_heads=2),
            transformer_dim=embed, iou_head_depth=2, iou_head_hidden_dim=32,
        ),
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_sam(tiny_sam_checkpoint) -> str:
    """Registers the tiny SAM as a segmenter named "tiny-sam"; returns the name."""

    def build(path, device):
        model = build_tiny_sam()
        model.load_state_dict(load_weights_file(path))
        return SamSegmenter(model, device, name=TINY_SAM)

    register_segmenter(SegmenterSpec(
        name=TINY_SAM, description="test-sized SAM, random weights",
        weights=WeightsFile("tiny_sam.pth", url=None, sha256=file_sha256(tiny_sam_checkpoint)),
        build=build, proposal_defaults=dict(TINY_SAM_PROPOSALS),
    ))
    return TINY_SAM


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> str:
    """An open_clip model config (ViT 2 layers, text 2 layers) registered under TINY_CLIP."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip_config")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
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
