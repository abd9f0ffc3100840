"""The bytes on the wire: postcard varints and strings, frames, the hello
and the client messages (docs/PROTOCOL.md sections 3 to 5).

Internal to the package; `osps.client` and `osps.worker` build on it.
"""

from typing import List, Optional, Tuple

from .errors import ProtocolError, RemoteError

MAGIC = b"OSPS"
PROTOCOL_VERSION = 1
HELLO_LEN = 8
HELLO_ACCEPTED = 0
HELLO_VERSION_UNSUPPORTED = 1
HELLO_REFUSED = 2
HELLO_DENIED = 3
HELLO_FLAG_TOKEN = 1
MAX_TOKEN_LEN = 256
PREFIX_LEN = 4
MAX_FRAME = 64 * 1024
#: The operation the dispatcher answers itself by cancelling a request (PROTOCOL section 8).
OP_CANCEL = "cancel"
CANCEL_DONE = b"cancelled\n"
CANCEL_NOT_FOUND = b"not found\n"

# Largest varint per integer type, and the largest value its last byte may
# hold (section 5.1: postcard rejects anything else).
_VARINT_LIMITS = {"u16": (3, 0x03), "u32": (5, 0x0F), "u64": (10, 0x01)}


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant first."""
    if n < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return encode_varint(len(data)) + data


def encode_frame(body: bytes) -> bytes:
    """A frame: the body's length as u32 little-endian, then the body."""
    return len(body).to_bytes(PREFIX_LEN, "little") + body


class Reader:
    """Reads postcard values from a message body, front to back."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def varint(self, kind: str = "u64") -> int:
        max_len, max_last = _VARINT_LIMITS[kind]
        value = 0
        for i in range(max_len):
            if self.pos >= len(self.body):
                raise ProtocolError("message ends inside a varint")
            b = self.body[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i == max_len - 1 and b > max_last:
                    raise ProtocolError(f"varint too large for {kind}")
                return value
        raise ProtocolError(f"varint longer than {max_len} bytes for {kind}")

    def string(self) -> str:
        n = self.varint()
        if self.pos + n > len(self.body):
            raise ProtocolError("message ends inside a string")
        raw = self.body[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"string is not UTF-8: {e}") from None

    def strings(self, most: int = 64) -> List[str]:
        n = self.varint()
        if n > most:
            raise ProtocolError(f"{n} strings where at most {most} are allowed")
        return [self.string() for _ in range(n)]

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(f"{len(self.body) - self.pos} trailing bytes after the message")


def encode_hello(version: int = PROTOCOL_VERSION, field: int = 0) -> bytes:
    """The 8 bytes: "OSPS", version u16 LE, flags (client) / status (server) u16 LE."""
    return MAGIC + version.to_bytes(2, "little") + field.to_bytes(2, "little")


def decode_hello(data: bytes) -> Optional[Tuple[int, int]]:
    """(version, field), or None when it is not an OSPS hello."""
    if len(data) != HELLO_LEN or data[:4] != MAGIC:
        return None
    return int.from_bytes(data[4:6], "little"), int.from_bytes(data[6:8], "little")


def encode_opening(token: Optional[bytes] = None) -> bytes:
    """What a client sends first: the hello, then its token if it has one."""
    if token is None:
        return encode_hello(PROTOCOL_VERSION, 0)
    return (encode_hello(PROTOCOL_VERSION, HELLO_FLAG_TOKEN)
            + len(token).to_bytes(2, "little") + token)


def encode_request(req_id: int, op: str, args: List[str], payload_len: int) -> bytes:
    """Body of a Request: id u64, op String, args Vec<String>, payload_len u64."""
    body = encode_varint(req_id) + encode_string(op) + encode_varint(len(args))
    for a in args:
        body += encode_string(a)
    return body + encode_varint(payload_len)


def decode_response(body: bytes) -> Tuple[int, Optional[RemoteError], int]:
    """(id, error or None, result_len) of a whole Response body."""
    r = Reader(body)
    req_id = r.varint()
    outcome = r.varint("u32")
    error = None
    if outcome == 1:
        kind = r.varint("u32")
        error = RemoteError.of_kind(kind, r.string(), req_id)
    elif outcome != 0:
        raise ProtocolError(f"unknown Outcome variant {outcome}")
    result_len = r.varint()
    r.end()
    if error is not None and result_len != 0:
        raise ProtocolError("an error reply announced result bytes")
    return req_id, error, result_len
