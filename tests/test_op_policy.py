"""The op policy (Note [Deny by default] in protocol/ops.py), driven directly: the shipped
allowlist, what it refuses, and the executor's checks around each op (Note [Checks around an
op]). Each attack here was performed against the server before this policy existed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gpupool.protocol import messages as m
from gpupool.protocol import ops as oplist
from gpupool.server.executor import Executor, OpFailed, Ref
from gpupool.server.oppolicy import OpDenied, OpPolicy, build_spec
from gpupool.server.sanitisers import SANITISERS, family, unsafe_kernels
from gpupool.torchcodec import op_name, resolve_op

MiB = 1024**2
SHIPPED = oplist.parse(oplist.ALLOWLIST_FILE.read_text(), str(oplist.ALLOWLIST_FILE))


def _policy(*extra: str) -> OpPolicy:
    """The shipped policy, plus `ones` (which the client builds from `empty` and `fill_`, but
    which makes a test tensor in one op) and `extra` (to drive checks behind the list)."""
    return OpPolicy(oplist.Allowlist(SHIPPED.ops | {"aten::ones", *extra}, SHIPPED.strings, "test"))


def _op(ex: Executor, name: str, args: list[Any], outs: list[int], **kwargs: Any) -> Any:
    return ex.run_op(m.Op(1, name, args, kwargs, outs))


# ---- the list itself ---------------------------------------------------------------------------


def test_every_listed_op_is_allowed_by_this_torch() -> None:
    """No dead or refused entries: each name resolves, is canonical, and passes the schema
    checks (argument types, listed string values, a sanitiser where the kernel sweep says)."""
    assert len(SHIPPED.ops) > 300
    unsafe = unsafe_kernels()
    for name in sorted(SHIPPED.ops):
        fn = resolve_op(name)
        assert op_name(fn) == name, f"{name} is not the canonical name ({op_name(fn)})"
        build_spec(name, fn, SHIPPED, unsafe)


def test_the_list_names_nothing_denied() -> None:
    assert not SHIPPED.ops & oplist.DENIED
    assert not [n for n in SHIPPED.ops if "from_file" in n or "sparse" in n or "mkldnn" in n]


def test_the_server_uses_the_shipped_list_unless_told_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("GPUPOOL_ALLOWLIST", raising=False)
    assert oplist.load().ops == SHIPPED.ops
    monkeypatch.setenv("GPUPOOL_ALLOWLIST", "/nonexistent/list.txt")
    with pytest.raises(oplist.AllowlistError, match="cannot read the op allowlist"):
        oplist.load()


@pytest.mark.parametrize("text, expect", [
    ("aten::add.Tensor\n", "outside the"),
    ("[ops]\naten::add Tensor\n", "not a canonical op name"),
    ("[ops]\nos::system\n", "not a canonical op name"),
    ("[strings]\nmode\n", "expected 'argument = value"),
])
def test_a_malformed_list_is_refused(text: str, expect: str) -> None:
    with pytest.raises(oplist.AllowlistError, match=expect):
        oplist.parse(text)


# ---- what the policy refuses -------------------------------------------------------------------


@pytest.mark.parametrize("sent", ["aten::from_file", "aten::from_file.default", "aten::from_file.out"])
def test_from_file_is_refused_by_every_name(sent: str) -> None:
    """The attack: `from_file.out` (and `.default`, which the old name check compared as a
    string) read the controller's database and key. Judged by the resolved overload now."""
    with pytest.raises(OpDenied, match="not allowed"):
        _policy().spec(sent)


def test_a_default_overload_is_judged_by_its_canonical_name() -> None:
    assert _policy().spec("aten::mm.default").name == "aten::mm"
    assert _policy().spec("aten::mm").name == "aten::mm"


@pytest.mark.parametrize("sent, expect", [
    ("aten::to_sparse", "not on the server's op allowlist"),  # no sparse layouts at all
    ("aten::_sparse_coo_tensor_with_dims_and_tensors", "not allowed"),
    ("aten::to_mkldnn", "not on the server's op allowlist"),
    ("aten::einsum", "free-form text"),  # even if listed: its equation is free text
    ("aten::_assert_async.msg", "free-form text"),
    ("aten::set_.source_Storage", "not allowed"),
    ("aten::no_such_op", "unknown op"),
    ("prims::add", "namespace 'prims'"),
])
def test_ops_off_the_list_or_unsafe_by_schema_are_refused(sent: str, expect: str) -> None:
    policy = _policy("aten::einsum", "aten::_assert_async.msg")
    with pytest.raises(OpDenied, match=expect):
        policy.spec(sent)


def test_an_op_the_kernel_sweep_found_unsafe_needs_a_sanitiser() -> None:
    fn = torch.ops.aten.index_select.default
    listed = oplist.Allowlist(frozenset({"aten::index_select"}), {}, "test")
    with pytest.raises(OpDenied, match="has no sanitiser"):
        build_spec("aten::index_select", fn, listed, frozenset({"aten::index_select"}))
    assert build_spec("aten::index_select", fn, listed, frozenset()).sanitise is None
    # Note [Kernel families]: an unsafe finding covers every overload of the op's family
    with pytest.raises(OpDenied, match="has no sanitiser"):
        build_spec("aten::index_select.out", torch.ops.aten.index_select.out,
                   oplist.Allowlist(frozenset({"aten::index_select.out"}), {}, "test"), frozenset({"aten::index_select"}))
    unsafe = unsafe_kernels()
    assert "aten::max_pool2d_with_indices_backward" in unsafe and "aten::_fft_c2c" in unsafe
    missing = [n for n in SHIPPED.ops if family(n) in unsafe and n not in SANITISERS]
    assert not missing, f"listed ops the kernel sweep found unsafe, with no sanitiser: {missing}"


# ---- the executor's checks ---------------------------------------------------------------------


def test_string_arguments_take_only_listed_values() -> None:
    ex = Executor(torch.device("cpu"), 64 * MiB, _policy())
    _op(ex, "aten::ones", [[4]], [1])
    _op(ex, "aten::gelu", [Ref(1)], [2], approximate="tanh")
    for bad in ("/etc/passwd", "tanh ", 7):
        with pytest.raises(OpFailed, match="must be one of") as ei:
            _op(ex, "aten::gelu", [Ref(1)], [3], approximate=bad)
        assert ei.value.kind == "denied"
    assert set(ex.table) == {1, 2}


def test_an_explicit_generator_is_refused() -> None:
    ex = Executor(torch.device("cpu"), 64 * MiB, _policy())
    _op(ex, "aten::ones", [[4]], [1])
    with pytest.raises(OpFailed, match="explicit generators"):
        _op(ex, "aten::normal_", [Ref(1)], [-1], generator=torch.Generator())
    assert set(ex.table) == {1}


@pytest.mark.parametrize("op, args", [
    ("aten::to_sparse", [Ref(1)]),
    ("aten::_to_sparse_csr", [Ref(1)]),
    ("aten::to_mkldnn", [Ref(1)]),
    ("aten::quantize_per_tensor", [Ref(1), 0.1, 0, torch.qint8]),
])
def test_results_that_are_not_strided_dense_are_never_kept(op: str, args: list[Any]) -> None:
    """The attack: sparse and mkldnn results kept a usable handle and were never counted (216
    MiB live under a 128 MiB share); a quantized result with a reply ended the session with an
    internal error. Even an op a list wrongly names cannot keep such a result."""
    policy = _policy(op)
    ex = Executor(torch.device("cpu"), 64 * MiB, policy)
    _op(ex, "aten::ones", [[4, 4]], [1])
    used = ex.memory_used()
    with pytest.raises(OpFailed, match="only strided dense tensors") as ei:
        _op(ex, op, args, [2])
    assert ei.value.kind == "denied"
    assert set(ex.table) == {1} and ex.memory_used() == used
    # The same op with a reply: an op error in the reply, the session carries on.
    sent: list[bytes] = []

    class Writer:
        def send(self, message: bytes, buffers: Any = ()) -> None:
            sent.append(message)

    assert ex.handle(m.Op(2, op, args, {}, [3], reply=True), None, Writer()) is False  # type: ignore[arg-type]
    reply = m.server_message_decoder.decode(sent[-1])
    assert isinstance(reply, m.OpResult) and reply.error is not None and reply.error.kind == "denied"
    assert set(ex.table) == {1}


def test_a_failed_op_leaves_no_handle() -> None:
    ex = Executor(torch.device("cpu"), 64 * MiB, _policy())
    _op(ex, "aten::ones", [[4]], [1])
    for op, args in [("aten::mm", [Ref(1), Ref(1)]),  # 1-D: mm refuses
                     ("aten::mm", [Ref(1), Ref(77)])]:  # no such handle
        assert ex.handle(m.Op(5, op, args, {}, [2]), None, None) is False  # type: ignore[arg-type]
        err = ex._take_error()
        assert err is not None and err.seq == 5
        assert set(ex.table) == {1}


def test_the_allowlist_environment_variable_is_read_by_workers(tmp_path: Path) -> None:
    """$GPUPOOL_ALLOWLIST is an administrator's file: a list that does not parse stops the
    policy from being built rather than running with a guessed list."""
    bad = tmp_path / "list.txt"
    bad.write_text("aten::mm\n")
    env = dict(os.environ, GPUPOOL_ALLOWLIST=str(bad))
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from gpupool.server.oppolicy import OpPolicy; OpPolicy()"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "outside the [strings] and [ops] sections" in r.stderr
