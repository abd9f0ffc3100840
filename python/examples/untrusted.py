"""An example worker: operations on untrusted input, where isolation matters.

Parsers of files from strangers are where crashes, hangs and memory blow-ups
come from. Run them in OSPS workers and a bad file costs one job: the
worker is replaced, the pool serves on, the caller gets a typed error.

    [pools.untrusted]
    program = ["/path/to/venv/bin/python", "-m", "untrusted"]
    cwd = "/path/to/osps/python/examples"
    workers = 4
    job_timeout_ms = 5000        # a parser that hangs is killed
    memory_limit_mib = 256       # one that eats memory gets `out of memory`

    >>> import osps
    >>> with osps.connect() as c:
    ...     c.call("xmlstats", b"<a><b/><b/></a>")
    b'{"elements": 3, "root": "a", "tags": {"a": 1, "b": 2}}'
"""

import hashlib
import io
import json
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter

from osps import InvalidInputError
from osps.worker import Worker

w = Worker("untrusted")


@w.op("xmlstats")
def xmlstats(data: memoryview, args: list) -> bytes:
    """Counts the elements of an XML document, by tag."""
    parser = ET.XMLPullParser(events=("start",))
    tags: Counter = Counter()
    root = None
    try:
        # Fed in pieces from the segment: no whole copy of the document.
        for i in range(0, len(data), 1 << 16):
            parser.feed(data[i:i + (1 << 16)])
            for _event, elem in parser.read_events():
                root = root or elem.tag
                tags[elem.tag] += 1
                elem.clear()
        parser.close()
    except ET.ParseError as e:  # a SyntaxError, not a ValueError: said to be the input's fault here
        raise InvalidInputError(f"not well-formed XML: {e}") from None
    return json.dumps({"elements": sum(tags.values()), "root": root, "tags": dict(tags)},
                      sort_keys=True).encode()


@w.op("zipindex")
def zipindex(data: memoryview, args: list) -> bytes:
    """Lists a zip archive's members with their sizes and SHA-256 digests."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))  # zipfile wants a file: this one is a copy
        lines = []
        for info in z.infolist():
            digest = hashlib.sha256()
            with z.open(info) as f:
                for chunk in iter(lambda: f.read(1 << 16), b""):
                    digest.update(chunk)
            lines.append(f"{info.file_size}\t{digest.hexdigest()}\t{info.filename}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise InvalidInputError(f"not a zip archive: {e}") from None
    return ("\n".join(lines) + "\n").encode()


if __name__ == "__main__":
    w.run()
