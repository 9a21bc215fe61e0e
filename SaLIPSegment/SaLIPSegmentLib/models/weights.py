"""The one place that finds model weights: explicit path, model directory, cache, download.

Air-gapped machines put files in a model directory (`--model-dir` or SALIP_MODEL_DIR).
Downloads go to the cache (SALIP_CACHE_DIR, default ~/.cache/salip), are checked
against their SHA256 while they stream, and appear only once complete (temporary
file, then rename), so an interrupted download never leaves a half file behind.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import Cancelled, ChecksumError, MissingWeightsError, ModelError

CHUNK = 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30
PARTIAL_SUFFIX = ".part"

ByteProgress = Callable[[int, Optional[int]], None]
"""`(bytes received, bytes in all or None)` after each chunk of a download."""


@dataclass(frozen=True)
class WeightsFile:
    """A weights file we know: its name, where it officially comes from, its digest."""

    filename: str
    url: Optional[str]
    sha256: Optional[str]
    size_bytes: Optional[int] = None
    bundled: Optional[Callable[[], Path]] = None
    """Returns the path of a copy shipped inside an installed package, if any."""


def cache_dir() -> Path:
    return Path(os.environ.get("SALIP_CACHE_DIR") or Path.home() / ".cache" / "salip")


def model_dir(explicit: Optional[os.PathLike] = None) -> Optional[Path]:
    value = explicit or os.environ.get("SALIP_MODEL_DIR")
    return Path(value).expanduser() if value else None


def offline() -> bool:
    return os.environ.get("SALIP_OFFLINE", "").lower() in {"1", "true", "yes"}


def file_sha256(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, spec: WeightsFile) -> None:
    """Raise ChecksumError unless the file has the spec's SHA256 (when it has one)."""
    if spec.sha256 is None:
        return
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise ChecksumError(
            f"{path} does not match the official {spec.filename}: SHA256 is {actual}, "
            f"expected {spec.sha256}. Delete it and download again"
            + (f" from {spec.url}." if spec.url else ".")
        )


def candidate_paths(spec: WeightsFile, explicit_dir: Optional[os.PathLike] = None):
    """Where the file may already be, in the order they are tried."""
    directory = model_dir(explicit_dir)
    if directory is not None:
        yield directory / spec.filename
    yield cache_dir() / spec.filename
    if spec.bundled is not None:
        bundled = spec.bundled()
        if bundled is not None:
            yield Path(bundled)


def find_local(spec: WeightsFile, explicit_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    return next((p for p in candidate_paths(spec, explicit_dir) if p.is_file()), None)


def missing_message(spec: WeightsFile, explicit_dir: Optional[os.PathLike] = None) -> str:
    directory = model_dir(explicit_dir)
    where = [str(directory / spec.filename)] if directory else []
    where.append(str(cache_dir() / spec.filename))
    source = f"Download it from {spec.url} and put it" if spec.url else "It has no download address; put it"
    return (
        f"Model weights {spec.filename} are not on this machine and could not be downloaded. "
        f"{source} at {' or '.join(where)} "
        "(or pass --model-dir / set SALIP_MODEL_DIR to the folder that holds it)."
    )


def resolve(
    spec: WeightsFile,
    path: Optional[os.PathLike] = None,
    explicit_dir: Optional[os.PathLike] = None,
    download: bool = True,
    progress: bool = True,
    should_cancel: Optional[Callable[[], bool]] = None,
    on_bytes: Optional[ByteProgress] = None,
) -> Path:
    """The verified path of a weights file, downloading it into the cache if need be.

    `should_cancel()` is checked after every chunk of a download; a cancelled download
    raises Cancelled and leaves nothing behind. `on_bytes(received, total)` follows it.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"Weights file {path} does not exist.")
        verify(path, spec)
        return path
    found = find_local(spec, explicit_dir)
    if found is not None:
        verify(found, spec)
        return found
    if not download or offline() or spec.url is None:
        raise MissingWeightsError(missing_message(spec, explicit_dir))
    try:
        return fetch(spec, cache_dir() / spec.filename, progress=progress, should_cancel=should_cancel,
                     on_bytes=on_bytes)
    except (urllib.error.URLError, OSError) as error:
        raise MissingWeightsError(f"{missing_message(spec, explicit_dir)} ({error})") from error


class UntrustedRedirect(ModelError):
    """A download was redirected away from the official host."""


class _OfficialHostOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within the official URL's host, and never from https down to http."""

    def __init__(self, url: str):
        self.url, self.official = url, urllib.parse.urlsplit(url)

    def redirect_request(self, request, fp, code, msg, headers, new_url):
        target = urllib.parse.urlsplit(urllib.parse.urljoin(request.full_url, new_url))
        if target.hostname != self.official.hostname or (self.official.scheme == "https" and target.scheme != "https"):
            raise UntrustedRedirect(
                f"The download from {self.url} was redirected to {target.scheme}://{target.netloc}, which is not "
                f"the official host {self.official.hostname}: refused, nothing was downloaded. Fetch the file "
                "by hand from the official page and put it in the model directory.")
        return super().redirect_request(request, fp, code, msg, headers, new_url)


def _open_official(url: str):
    """Open url with redirects restricted to its own host (the registry only holds official URLs)."""
    return urllib.request.build_opener(_OfficialHostOnly(url)).open(url, timeout=DOWNLOAD_TIMEOUT_S)


def partial_prefix(filename: str, pid: Optional[int] = None) -> str:
    """How a download in process `pid` names its temporary file: a process that kills the
    downloading one (the settings panel's Cancel) finds and removes exactly that file."""
    return f".{filename}.{os.getpid() if pid is None else pid}."


def remove_partials(filename: str, pid: int, folder: Optional[Path] = None) -> list:
    """Delete the temporary files a killed process `pid` left for `filename`; returns their paths."""
    folder = Path(folder) if folder is not None else cache_dir()
    pattern = glob.escape(partial_prefix(filename, pid)) + "*" + PARTIAL_SUFFIX
    removed = sorted(folder.glob(pattern)) if folder.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def fetch(
    spec: WeightsFile,
    destination: Path,
    progress: bool = True,
    should_cancel: Optional[Callable[[], bool]] = None,
    on_bytes: Optional[ByteProgress] = None,
) -> Path:
    """Download spec.url to destination atomically, checking SHA256 as it streams."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(prefix=partial_prefix(spec.filename), suffix=PARTIAL_SUFFIX,
                                         dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as out, _open_official(spec.url) as response:
            announced = int(response.headers.get("Content-Length") or 0)
            bar = _progress_bar(announced or spec.size_bytes, spec.filename) if progress else None
            received = 0
            # read1: whatever has arrived (up to CHUNK), so progress and cancel follow a slow link.
            for chunk in iter(lambda: response.read1(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"Download of {spec.filename} cancelled; nothing was kept.")
                if bar is not None:
                    bar.update(len(chunk))
                if on_bytes is not None:
                    on_bytes(received, announced or spec.size_bytes)
            if bar is not None:
                bar.close()
        if announced and received != announced:
            raise MissingWeightsError(
                f"The download of {spec.filename} from {spec.url} stopped after {received} of "
                f"{announced} bytes; nothing was kept. Try again, or fetch it by hand."
            )
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise ChecksumError(
                f"Downloaded {spec.filename} from {spec.url} has SHA256 {digest.hexdigest()}, "
                f"expected {spec.sha256}; it was discarded."
            )
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from colleagues
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination


def _progress_bar(total: Optional[int], name: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)
