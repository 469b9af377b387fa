"""Mutations of gpupool's messages and command streams that keep them close to real ones.

Three levels, each a pure function of its input and a `random.Random`:

- bytes (`mutate_bytes`): flips, interesting bytes, cuts and copies; what breaks msgpack itself;
- msgpack trees (`mutate_message`): decode without a schema, change one value, encode again.
  With `typed`, a value keeps its msgpack type (an int stays an int) and command arrays keep
  their length, so the strict decoder still accepts the batch and the mutation reaches the
  executor instead of ending the session at the decoder;
- streams (`mutate_frames`): frames dropped, repeated, swapped, spliced from other sessions,
  generated ops (`gen_op`, from the op's own schema and a random allowed name) inserted, with
  each upload's buffer kept matching its announced size (`fix_buffers`) unless told not to.
"""

from __future__ import annotations

import copy
import math
import random
import struct
from typing import Any

import msgspec

from gpupool.protocol import messages as m

Ext = msgspec.msgpack.Ext
Frame = tuple[bytes, list[bytes]]

INTS = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
        2**31 - 1, 2**31, -2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, -2**63, 2**64 - 1, -2, -3, -16]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 5e-324, 1e30, -1e30, 1.7976931348623157e308, math.inf,
          -math.inf, math.nan, 3.0, 100.0]
TAGS = ["op", "up", "free", "seed", "fetch", "item", "sync", "stats", "getrng", "setrng", "bye"]
#: Commands that make the server send a reply frame (and `op` with its `reply` set).
REPLYING = {"fetch", "item", "sync", "stats", "getrng"}
KWARGS = ["dtype", "device", "layout", "pin_memory", "memory_format", "out", "alpha", "dim", "keepdim",
          "generator", "non_blocking", "copy", "size", "stride", "value", "indices", "reduce", "mode",
          "rounding_mode", "approximate", "p", "ord", "indexing", "correction", "unbiased", "self", "other"]
DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16", "complex64", "complex128", "complex32", "uint8",
               "int8", "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn",
               "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "qint8", "float33", ""]
MEMORY_FORMATS = ["contiguous_format", "channels_last", "channels_last_3d", "preserve_format", "sparse"]
LAYOUTS = ["strided", "sparse_coo", "jagged"]


class Context:
    """What mutations draw from: handles that exist, op names, string values."""

    def __init__(self, handles: list[int] | None = None, ops: list[str] | None = None,
                 strings: dict[str, list[str]] | None = None) -> None:
        self.handles = list(handles or [1, 2, 3])
        self.ops = ops or _allowlist_ops()
        self.strings = strings if strings is not None else _allowlist_strings()
        self.next_handle = 5000
        self.sessions: list[list[Frame]] = []  # for splicing
        #: Handles that surely exist where the mutated stream runs (set per stream by the caller).
        self.local: list[int] = []

    def handle(self, rng: random.Random) -> int:
        """A handle (a u64): mostly one that exists where the stream runs."""
        r = rng.random()
        if r < 0.75 and self.local:
            h = rng.choice(self.local)
        elif r < 0.9 and self.handles:
            h = rng.choice(self.handles)
        elif r < 0.95:
            h = rng.choice(INTS)
        else:
            h = self.fresh()
        return h & 0xFFFF_FFFF_FFFF_FFFF

    def fresh(self) -> int:
        self.next_handle = 5000 + (self.next_handle - 4999) % 3000
        return self.next_handle

    def saw(self, handles: list[int]) -> None:
        for h in handles:
            if type(h) is int and 0 <= h < 1 << 64 and h not in self.handles:
                self.handles.append(h)
        del self.handles[:-400]


def _allowlist_ops() -> list[str]:
    from gpupool.protocol.ops import load

    return sorted(load().ops)


def _allowlist_strings() -> dict[str, list[str]]:
    from gpupool.protocol.ops import load

    return {k: sorted(v) for k, v in load().strings.items()}


# ---- bytes -------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random, max_size: int = 1 << 16) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        if not b:
            b += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xC7, 0xD4, 0xCF, 0x90, 0x9F))
        elif op == 2:
            del b[i:i + rng.randrange(1, 9)]
        elif op == 3:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randrange(1, 33)]
        elif op == 4:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 5:
            del b[i:]
        elif op == 6 and len(b) >= i + 4:
            struct.pack_into("<I", b, i, rng.choice((0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)))
        else:
            b[i] = (b[i] + rng.choice((-1, 1, 16, -16))) & 0xFF
    return bytes(b[:max_size])


# ---- msgpack trees -----------------------------------------------------------------------------


def _nodes(tree: Any, typed: bool) -> list[tuple[Any, Any, bool]]:
    """(container, key, in_command_array) for every value below `tree`."""
    out: list[tuple[Any, Any, bool]] = []
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack and len(out) < 5000:
        node, _ = stack.pop()
        if isinstance(node, list):
            is_cmd = bool(node) and isinstance(node[0], str) and node[0] in TAGS
            for i, v in enumerate(node):
                if is_cmd and i == 0 and typed:
                    continue  # the tag: kept in typed mode
                out.append((node, i, is_cmd))
                if isinstance(v, (list, dict)):
                    stack.append((v, is_cmd))
        elif isinstance(node, dict):
            for k, v in node.items():
                if typed and k == "type":
                    continue
                out.append((node, k, False))
                if isinstance(v, (list, dict)):
                    stack.append((v, False))
    return out


def new_value(old: Any, rng: random.Random, ctx: Context | None, typed: bool) -> Any:
    """A replacement for `old`: of its msgpack type when `typed`, else anything."""
    if not typed and rng.random() < 0.3:
        old = rng.choice([0, 1.5, "x", b"", [], {}, None, True, Ext(1, b"\x01" * 8)])
    t = type(old)
    if t is bool:
        return not old
    if t is int:
        r = rng.random()
        if r < 0.35:
            return rng.choice(INTS)
        if r < 0.55 and ctx is not None:
            return ctx.handle(rng)
        if r < 0.8:
            return old + rng.choice((-1, 1, -2, 2, 8, -8))
        return rng.randrange(-64, 65)
    if t is float:
        return rng.choice(FLOATS) if rng.random() < 0.7 else old * rng.choice((2.0, -1.0, 0.5, 1e10))
    if t is str:
        return _new_string(old, rng, ctx)
    if t is bytes:
        return mutate_bytes(old, rng) if old or rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(16))
    if t is Ext:
        return _new_ext(old, rng, ctx)
    if t is list:
        if typed and len(old) > 1 and isinstance(old[0], str) and old[0] in TAGS:
            cmd = list(old)  # a command array keeps its length and tag: one field changes
            i = rng.randrange(1, len(cmd))
            cmd[i] = new_value(cmd[i], rng, ctx, True)
            return cmd
        return _new_list(old, rng, ctx, typed)
    if t is dict:
        d = dict(old)
        r = rng.random()
        if d and r < 0.3:
            del d[rng.choice(list(d))]
        elif r < 0.7:
            d[rng.choice(KWARGS)] = _any_value(rng, ctx)
        elif d:
            k = rng.choice(list(d))
            d[k] = new_value(d[k], rng, ctx, typed=False)
        return d
    if old is None:
        return _any_value(rng, ctx) if not typed or rng.random() < 0.5 else None
    return old


def _new_string(old: str, rng: random.Random, ctx: Context | None) -> str:
    r = rng.random()
    if "::" in old and ctx is not None and r < 0.7:
        return rng.choice(ctx.ops)
    if old in DTYPE_NAMES and r < 0.7:
        return rng.choice(DTYPE_NAMES)
    if ctx is not None and r < 0.8:
        pool = [v for vs in ctx.strings.values() for v in vs]
        if pool:
            return rng.choice(pool)
    if r < 0.9 and old:
        i = rng.randrange(len(old))
        return old[:i] + rng.choice(("", "x", ".", "::", "\x00", "é", old[i:i + 1] * 2)) + old[i + 1:]
    return rng.choice(("", "aten::", "aten::add", "os::system", "a" * 300, "prim::Constant", "aten::mm.default"))


def _new_ext(old: Ext, rng: random.Random, ctx: Context | None) -> Ext:
    r = rng.random()
    code, data = old.code, bytes(old.data)
    if r < 0.05:
        return Ext(rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 127, -1)), data)
    if code == m.ExtCode.TENSOR or r < 0.1:
        h = ctx.handle(rng) if ctx is not None else rng.choice(INTS) & 0xFFFF_FFFF_FFFF_FFFF
        return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(h) if rng.random() < 0.95 else m.HANDLE.pack(h)[:rng.randrange(9)])
    if code == m.ExtCode.DTYPE:
        return Ext(code, rng.choice(DTYPE_NAMES).encode())
    if code == m.ExtCode.MEMORY_FORMAT:
        return Ext(code, rng.choice(MEMORY_FORMATS).encode())
    if code == m.ExtCode.LAYOUT:
        return Ext(code, rng.choice(LAYOUTS).encode())
    if code == m.ExtCode.COMPLEX:
        return Ext(code, m.COMPLEX.pack(rng.choice(FLOATS), rng.choice(FLOATS)) if rng.random() < 0.9 else data[:9])
    if code == m.ExtCode.CPU_TENSOR:
        try:
            inner = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            return Ext(code, mutate_bytes(data, rng))
        if isinstance(inner, list) and len(inner) == 3 and rng.random() < 0.8:
            i = rng.randrange(3)
            inner[i] = new_value(inner[i], rng, None, typed=rng.random() < 0.8)
            return Ext(code, msgspec.msgpack.encode(inner))
        return Ext(code, mutate_bytes(data, rng))
    return Ext(code, mutate_bytes(data, rng) if data else b"\x00")


def _new_list(old: list, rng: random.Random, ctx: Context | None, typed: bool) -> list:
    lst = list(old)
    # Note: in typed mode a list of one type (shape, handles, the batch's commands) keeps it.
    same = typed and bool(lst) and len({type(v) for v in lst}) == 1

    def element() -> Any:
        if same:
            v = copy.deepcopy(rng.choice(lst))
            return v if rng.random() < 0.5 or type(v) is list else new_value(v, rng, ctx, True)
        return _any_value(rng, ctx) if not lst or rng.random() < 0.5 else copy.deepcopy(rng.choice(lst))

    r = rng.random()
    if not lst or r < 0.25:
        if lst or not typed:
            lst.insert(rng.randrange(len(lst) + 1), element())
    elif r < 0.5:
        del lst[rng.randrange(len(lst))]
    elif r < 0.6:
        rng.shuffle(lst)
    elif r < 0.7:
        lst = lst * rng.choice((2, 3, 16))
    elif r < 0.75:
        lst = []
    else:
        i = rng.randrange(len(lst))
        lst[i] = new_value(lst[i], rng, ctx, typed=same or rng.random() < 0.6)
    return lst


def _any_value(rng: random.Random, ctx: Context | None) -> Any:
    r = rng.random()
    if r < 0.3 and ctx is not None:
        return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(ctx.handle(rng)))
    if r < 0.5:
        return rng.choice(INTS[:20])
    if r < 0.6:
        return [rng.randrange(-1, 5) for _ in range(rng.randrange(4))]
    if r < 0.7:
        return rng.choice(FLOATS)
    if r < 0.75:
        return Ext(m.ExtCode.DTYPE, rng.choice(DTYPE_NAMES).encode())
    if r < 0.8:
        return Ext(m.ExtCode.DEVICE, b"")
    if r < 0.85:
        return None
    if r < 0.9:
        return rng.choice((True, False))
    if r < 0.95 and ctx is not None:
        return [Ext(m.ExtCode.TENSOR, m.HANDLE.pack(ctx.handle(rng))) for _ in range(rng.randrange(1, 4))]
    return rng.choice(("mean", "sum", "none", "x", ""))


def mutate_tree(tree: Any, rng: random.Random, ctx: Context | None = None, typed: bool = True) -> Any:
    """`tree` with one to three values changed (in place where it can; returns the new tree)."""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        nodes = _nodes(tree, typed)
        if not nodes:
            return new_value(tree, rng, ctx, typed)
        container, key, in_cmd = rng.choice(nodes)
        old = container[key]
        # Note: a command array keeps its length in typed mode (the decoder checks arity).
        container[key] = new_value(old, rng, ctx, typed)
    return tree


def mutate_message(raw: bytes, rng: random.Random, ctx: Context | None = None, typed: bool = True) -> bytes | None:
    """`raw` (msgpack) with values changed; None if `raw` is not msgpack."""
    try:
        tree = msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    try:
        return msgspec.msgpack.encode(mutate_tree(tree, rng, ctx, typed))
    except (OverflowError, TypeError, ValueError, RecursionError):
        return None


# ---- generated ops -----------------------------------------------------------------------------

_SCHEMAS: dict[str, Any] = {}


def _schema(name: str) -> Any:
    if name not in _SCHEMAS:
        from gpupool.torchcodec import resolve_op

        try:
            _SCHEMAS[name] = resolve_op(name)._schema
        except LookupError:
            _SCHEMAS[name] = None
    return _SCHEMAS[name]


def _arg(kind: str, arg_name: str, rng: random.Random, ctx: Context) -> Any:
    optional = kind.startswith("Optional[")
    if optional:
        if rng.random() < 0.3:
            return None
        kind = kind[len("Optional["):-1]

    def small() -> int:
        return rng.choice((0, 1, 2, -1, 3, 4)) if rng.random() < 0.85 else rng.choice(INTS)

    if kind == "Tensor":
        return Ext(m.ExtCode.TENSOR, m.HANDLE.pack(ctx.handle(rng)))
    if kind.startswith("List[") and "Tensor" in kind:
        return [None if "Optional" in kind and rng.random() < 0.2 else Ext(m.ExtCode.TENSOR, m.HANDLE.pack(ctx.handle(rng)))
                for _ in range(rng.randrange(1, 4))]
    if kind in ("int", "SymInt"):
        return small()
    if kind.startswith("List[int]") or kind.startswith("List[SymInt]"):
        return [abs(small()) if rng.random() < 0.8 else small() for _ in range(rng.randrange(0, 4))]
    if kind == "float":
        return rng.choice((0.5, 1.0, 0.0, -1.0, 2.0)) if rng.random() < 0.85 else rng.choice(FLOATS)
    if kind.startswith("List[float]"):
        return [rng.choice((0.5, 1.0, 2.0)) for _ in range(rng.randrange(1, 4))]
    if kind == "bool":
        return rng.random() < 0.5
    if kind.startswith("List[bool]"):
        return [rng.random() < 0.5 for _ in range(rng.randrange(1, 4))]
    if kind in ("number", "Scalar"):
        return small() if rng.random() < 0.5 else rng.choice((0.5, -1.5, 2.0))
    if kind.startswith("List[number]"):
        return [small() for _ in range(rng.randrange(1, 3))]
    if kind == "ScalarType" or (kind == "int" and arg_name == "dtype"):
        return Ext(m.ExtCode.DTYPE, rng.choice(DTYPE_NAMES[:13]).encode())
    if kind == "Layout":
        return Ext(m.ExtCode.LAYOUT, b"strided")
    if kind == "MemoryFormat":
        return Ext(m.ExtCode.MEMORY_FORMAT, rng.choice(MEMORY_FORMATS[:4]).encode())
    if kind == "Device":
        return Ext(m.ExtCode.DEVICE, b"")
    if kind == "Generator":
        return None
    if kind == "str":
        values = ctx.strings.get(arg_name) or ["mean"]
        return rng.choice(values)
    return _any_value(rng, ctx)


_ENUM_ARGS = {"dtype": "ScalarType", "layout": "Layout", "memory_format": "MemoryFormat"}


def gen_op(rng: random.Random, ctx: Context, seq: int = 0) -> list[Any] | None:
    """An `op` command array for a random allowed op, with arguments its schema asks for."""
    name = rng.choice(ctx.ops)
    schema = _schema(name)
    if schema is None:
        return None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    skipping = False
    for a in schema.arguments:
        kind = str(getattr(a, "real_type", a.type))
        base = kind.removeprefix("Optional[").removesuffix("]")
        if base == "int" and a.name in _ENUM_ARGS:
            kind = kind.replace("int", _ENUM_ARGS[a.name])
        has_default = a.has_default_value()
        if a.kwarg_only:
            if not has_default or rng.random() < 0.5:
                kwargs[a.name] = _arg(kind, a.name, rng, ctx)
            continue
        if has_default and (skipping or rng.random() < 0.3):
            skipping = True  # positional defaults are dropped from the end only
            continue
        if skipping:
            break
        args.append(_arg(kind, a.name, rng, ctx))
    n_out = 0
    for r in schema.returns:
        kind = str(getattr(r, "real_type", r.type))
        n_out += rng.randrange(1, 4) if kind.startswith("List[") else (1 if "Tensor" in kind else 0)
    outs = [ctx.fresh() for _ in range(n_out)]
    reply = rng.random() < 0.5
    return ["op", seq, name, args, kwargs, outs, reply, []]


# ---- streams -----------------------------------------------------------------------------------


def commands(msg: bytes) -> list[Any] | None:
    """The command arrays of a batch message, without a schema; None if it is not one."""
    try:
        tree = msgspec.msgpack.decode(msg)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(tree, dict) and isinstance(tree.get("cmds"), list):
        return tree["cmds"]
    return None


def replies_expected(cmds: list[Any]) -> int:
    """How many reply frames the server sends for these commands, if it accepts them all."""
    n = 0
    for c in cmds:
        if isinstance(c, list) and c and isinstance(c[0], str):
            if c[0] in REPLYING or (c[0] == "op" and len(c) > 6 and c[6] is True):
                n += 1
    return n


def fix_buffers(msg: bytes, bufs: list[bytes], rng: random.Random, limit: int = 1 << 20) -> list[bytes]:
    """Buffers matching the uploads of `msg` in order (sizes up to `limit`; bigger ones are left
    as they are, and the frame is then one the server must refuse)."""
    cmds = commands(msg)
    if cmds is None:
        return bufs
    out = []
    old = list(bufs)
    for c in cmds:
        if not (isinstance(c, list) and len(c) >= 8 and c[0] == "up" and type(c[7]) is int):
            continue
        n = c[7]
        if not 0 <= n <= limit:
            return bufs
        b = old.pop(0) if old else b""
        if len(b) != n:
            b = (b * (n // max(1, len(b)) + 1))[:n] if b else bytes(rng.randrange(256) for _ in range(min(n, 64))) * (n // 64 + 1)
            b = b[:n]
        out.append(b)
    return out


def handles_of(frames: list[Frame]) -> list[int]:
    """Handles the frames' uploads and ops create."""
    out: list[int] = []
    for msg, _ in frames:
        for c in commands(msg) or []:
            if isinstance(c, list) and len(c) > 2 and c[0] == "up" and type(c[2]) is int:
                out.append(c[2])
            elif isinstance(c, list) and len(c) > 5 and c[0] == "op" and isinstance(c[5], list):
                out.extend(h for h in c[5] if type(h) is int)
    return [h for h in out if 0 <= h < 1 << 64]


def batch(cmds: list[Any]) -> bytes:
    return msgspec.msgpack.encode({"type": "batch", "cmds": cmds})


def gen_frame(rng: random.Random, ctx: Context) -> Frame:
    """A frame of generated ops, sometimes with a sync point."""
    cmds: list[Any] = []
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        op = gen_op(rng, ctx, seq=rng.randrange(1 << 20))
        if op is not None:
            cmds.append(op)
            ctx.saw(op[5])
            ctx.local.extend(op[5])
    if rng.random() < 0.3:
        cmds.append([rng.choice(("sync", "stats"))])
    if rng.random() < 0.1:
        cmds.append(["free", [ctx.handle(rng) for _ in range(rng.randrange(1, 5))]])
    return batch(cmds), []


def mutate_frame(f: Frame, rng: random.Random, ctx: Context, typed: bool = True, keep_buffers: bool = True) -> Frame:
    msg, bufs = f
    new = mutate_message(msg, rng, ctx, typed)
    if new is None:
        new = mutate_bytes(msg, rng)
    return new, (fix_buffers(new, bufs, rng) if keep_buffers else bufs)


def mutate_frames(frames: list[Frame], rng: random.Random, ctx: Context, typed: bool = True) -> list[Frame]:
    """`frames` with one stream-level change; `ctx.local` should name the handles that exist
    before them (the stream's own are added here)."""
    fs = list(frames)
    base = list(ctx.local)
    ctx.local = base + handles_of(fs)
    r = rng.random()
    if not fs or r < 0.25:
        fs.insert(rng.randrange(len(fs) + 1), gen_frame(rng, ctx))
    elif r < 0.6:
        i = rng.randrange(len(fs))
        fs[i] = mutate_frame(fs[i], rng, ctx, typed, keep_buffers=typed or rng.random() < 0.5)
    elif r < 0.68:
        del fs[rng.randrange(len(fs))]
    elif r < 0.76:
        i = rng.randrange(len(fs))
        fs.insert(rng.randrange(len(fs) + 1), fs[i])
    elif r < 0.82 and len(fs) > 1:
        i, j = rng.randrange(len(fs)), rng.randrange(len(fs))
        fs[i], fs[j] = fs[j], fs[i]
    elif r < 0.9 and ctx.sessions:
        other = rng.choice(ctx.sessions)
        if other:
            k = rng.randrange(len(other))
            fs[rng.randrange(len(fs) + 1):0] = other[k:k + rng.randrange(1, 4)]
    else:
        # a generated op appended to an existing frame's batch
        i = rng.randrange(len(fs))
        cmds = commands(fs[i][0])
        op = gen_op(rng, ctx)
        if cmds is not None and op is not None:
            cmds.insert(rng.randrange(len(cmds) + 1), op)
            fs[i] = (batch(cmds), fs[i][1])
    ctx.local = base
    return fs
