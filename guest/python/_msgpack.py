"""MessagePack, the values malt's manager and guests exchange.

The types that cross: None, bool, int (64-bit), float, str, bytes, list
(and tuple), dict, nested. Anything else is refused with an error that
names its type.
"""

import struct


class UnsupportedType(TypeError):
    """A value that does not cross to the manager."""


def packb(value):
    out = bytearray()
    _pack(value, out, 0)
    return bytes(out)


def _pack(v, out, depth):
    if depth > 512:
        raise UnsupportedType("cannot send a value nested more than 512 levels deep")
    if v is None:
        out.append(0xC0)
    elif v is True:
        out.append(0xC3)
    elif v is False:
        out.append(0xC2)
    elif type(v) is int or isinstance(v, int):
        _pack_int(int(v), out)
    elif isinstance(v, float):
        out.append(0xCB)
        out += struct.pack(">d", v)
    elif isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        n = len(b)
        if n < 32:
            out.append(0xA0 | n)
        elif n < 0x100:
            out += b"\xd9" + bytes((n,))
        elif n < 0x10000:
            out += b"\xda" + struct.pack(">H", n)
        else:
            out += b"\xdb" + struct.pack(">I", n)
        out += b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        n = len(b)
        if n < 0x100:
            out += b"\xc4" + bytes((n,))
        elif n < 0x10000:
            out += b"\xc5" + struct.pack(">H", n)
        else:
            out += b"\xc6" + struct.pack(">I", n)
        out += b
    elif isinstance(v, (list, tuple)):
        n = len(v)
        if n < 16:
            out.append(0x90 | n)
        elif n < 0x10000:
            out += b"\xdc" + struct.pack(">H", n)
        else:
            out += b"\xdd" + struct.pack(">I", n)
        for item in v:
            _pack(item, out, depth + 1)
    elif isinstance(v, dict):
        n = len(v)
        if n < 16:
            out.append(0x80 | n)
        elif n < 0x10000:
            out += b"\xde" + struct.pack(">H", n)
        else:
            out += b"\xdf" + struct.pack(">I", n)
        for key, item in v.items():
            _pack(key, out, depth + 1)
            _pack(item, out, depth + 1)
    else:
        raise UnsupportedType(
            f"cannot send a value of type {type(v).__qualname__} to the manager: "
            "only None, bool, int, float, str, bytes, list, tuple and dict cross"
        )


def _pack_int(n, out):
    if 0 <= n < 0x80:
        out.append(n)
    elif -32 <= n < 0:
        out.append(n & 0xFF)
    elif 0 <= n < 0x10000000000000000:
        if n < 0x100:
            out += b"\xcc" + bytes((n,))
        elif n < 0x10000:
            out += b"\xcd" + struct.pack(">H", n)
        elif n < 0x100000000:
            out += b"\xce" + struct.pack(">I", n)
        else:
            out += b"\xcf" + struct.pack(">Q", n)
    elif -0x8000000000000000 <= n < 0:
        if n >= -0x80:
            out += b"\xd0" + struct.pack(">b", n)
        elif n >= -0x8000:
            out += b"\xd1" + struct.pack(">h", n)
        elif n >= -0x80000000:
            out += b"\xd2" + struct.pack(">i", n)
        else:
            out += b"\xd3" + struct.pack(">q", n)
    else:
        raise UnsupportedType(f"the int {n} does not fit in 64 bits")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        start = self.pos
        end = start + n
        if end > len(self.data):
            raise ValueError("truncated MessagePack value")
        self.pos = end
        return self.data[start:end]


def unpackb(data):
    r = _Reader(bytes(data))
    v = _unpack(r, 0)
    if r.pos != len(r.data):
        raise ValueError("trailing bytes after the MessagePack value")
    return v


def _unpack(r, depth):
    if depth > 512:
        raise ValueError("the value is nested too deeply")
    b = r.take(1)[0]
    if b < 0x80:
        return b
    if b >= 0xE0:
        return b - 0x100
    if 0x80 <= b <= 0x8F:
        return _map(r, b & 0x0F, depth)
    if 0x90 <= b <= 0x9F:
        return [_unpack(r, depth + 1) for _ in range(b & 0x0F)]
    if 0xA0 <= b <= 0xBF:
        return r.take(b & 0x1F).decode("utf-8", "surrogatepass")
    if b == 0xC0:
        return None
    if b == 0xC2:
        return False
    if b == 0xC3:
        return True
    if b == 0xCB:
        return _F64.unpack(r.take(8))[0]
    if 0xCC <= b <= 0xD3:
        fmt = _INTS[b - 0xCC]
        return fmt.unpack(r.take(fmt.size))[0]
    if b == 0xCA:
        return struct.unpack(">f", r.take(4))[0]
    if b in (0xC4, 0xC5, 0xC6):
        return r.take(_length(r, b - 0xC4))
    if b in (0xD9, 0xDA, 0xDB):
        return r.take(_length(r, b - 0xD9)).decode("utf-8", "surrogatepass")
    if b in (0xDC, 0xDD):
        return [_unpack(r, depth + 1) for _ in range(_length(r, b - 0xDC + 1))]
    if b in (0xDE, 0xDF):
        return _map(r, _length(r, b - 0xDE + 1), depth)
    raise ValueError(f"unsupported MessagePack type byte 0x{b:02x}")


_F64 = struct.Struct(">d")
_INTS = [struct.Struct(f) for f in (">B", ">H", ">I", ">Q", ">b", ">h", ">i", ">q")]
_LENGTHS = [struct.Struct(f) for f in (">B", ">H", ">I")]


def _length(r, which):
    fmt = _LENGTHS[which]
    return fmt.unpack(r.take(fmt.size))[0]


def _map(r, n, depth):
    out = {}
    for _ in range(n):
        key = _unpack(r, depth + 1)
        if isinstance(key, list):
            key = tuple(key)
        out[key] = _unpack(r, depth + 1)
    return out
