"""A PEP 517 build backend for this package, standard library only, so that
`pip install ./python` needs no network and no setuptools or wheel (a venv
of Python 3.12+ has neither). It builds a pure-Python wheel of src/osps and
a source archive; the metadata comes from pyproject.toml's [project] table
(the few keys used here)."""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME, VERSION = "osps", "0.1.0"
DIST = f"{NAME}-{VERSION}"


def _metadata() -> str:
    with open(os.path.join(HERE, "pyproject.toml")) as f:
        text = f.read()
    summary = re.search(r'^description = "(.*)"$', text, re.M).group(1)
    python = re.search(r'^requires-python = "(.*)"$', text, re.M).group(1)
    version = re.search(r'^version = "(.*)"$', text, re.M).group(1)
    if version != VERSION:
        raise RuntimeError(f"pyproject.toml says version {version}, osps_build.py {VERSION}")
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    return (f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\nSummary: {summary}\n"
            f"License: MIT OR Apache-2.0\nRequires-Python: {python}\n"
            f"Description-Content-Type: text/markdown\n\n{readme}")


def _files():
    """(path in the wheel, bytes) of the package's files."""
    root = os.path.join(HERE, "src", NAME)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") or name == "py.typed":
            with open(os.path.join(root, name), "rb") as f:
                yield f"{NAME}/{name}", f.read()


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    wheel = f"{DIST}-py3-none-any.whl"
    info = f"{DIST}.dist-info"
    entries = list(_files())
    entries.append((f"{info}/METADATA", _metadata().encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: osps_build\n"
                                     b"Root-Is-Purelib: true\nTag: py3-none-any\n"))
    record = [_record_line(p, d) for p, d in entries] + [f"{info}/RECORD,,"]
    entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in entries:
            z.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return wheel


def build_sdist(sdist_directory, config_settings=None):
    name = f"{DIST}.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz") as t:
        for top in ("pyproject.toml", "README.md", "build_backend", "src"):
            t.add(os.path.join(HERE, top), f"{DIST}/{top}",
                  filter=lambda i: None if "__pycache__" in i.name else i)
        pkg_info = _metadata().encode()
        ti = tarfile.TarInfo(f"{DIST}/PKG-INFO")
        ti.size = len(pkg_info)
        t.addfile(ti, io.BytesIO(pkg_info))
    return name
