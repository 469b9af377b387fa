"""The tensor type whose data lives on a gpupool server.

A `RemoteTensor` is a wrapper subclass: shape, strides, dtype and device live on the client
(PyTorch reads them without calling us); the elements live on the server under `_h.id`.

Note [Conj bits]: a wrapper carries the same conjugate/negative bits as its server tensor (the
meta kernel's output bits, set on the wrapper when it is made, and mirrored in `_bits` so the
plan cache can key on them with one attribute read). PyTorch resolves those bits on the client
before most ops reach `__torch_dispatch__`; only the bit-aware ops (views, `clone`, `copy_`)
arrive with bits set, and the server, whose tensor has the same bits, gives them the same
meaning. Uploads resolve bits on the host, so a fresh upload never has any.

Note [Handle lifetime]: each wrapper owns one `Handle`. When the wrapper is collected, the
handle's `__del__` queues a free; the server frees the tensor at the next flush. Views get
their own handles, pointing at real views on the server, so the server's storage stays alive as
long as any handle of it does — aliasing is exactly that of the server's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpupool.client.session import Session

#: Wrappers claim a storage this large (they own no memory): in-place metadata changes
#: (resize_, as_strided_, set_) on the client then never fail a bounds check.
FAKE_STORAGE_BYTES = 1 << 50


#: `dispatch.item`, imported on first use (dispatch imports this module); an import statement
#: in `.item()` would cost half a microsecond per round trip.
_item: Callable[[RemoteTensor], Any] | None = None


def _load_item() -> Callable[[RemoteTensor], Any]:
    global _item
    from gpupool.client.dispatch import item

    _item = item
    return item


class Handle:
    """A server tensor object. Note: `detach` results share their source's handle (no remote op:
    same storage, same metadata); `shared` marks such a handle, and an op that could change a
    written tensor's metadata first gives that tensor a handle of its own (`dispatch._unshare`)."""

    __slots__ = ("id", "session", "shared", "__weakref__")

    def __init__(self, hid: int, session: Session) -> None:
        self.id = hid
        self.session = session
        self.shared = False

    def __del__(self) -> None:
        try:
            self.session.conn.frees.append(self.id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class RemoteTensor(torch.Tensor):
    _h: Handle
    #: Conjugate/negative bits (meta.CONJ | meta.NEG), set per instance only when nonzero.
    _bits: int = 0

    @staticmethod
    def __new__(
        cls,
        handle: Handle,
        shape: Any,
        stride: Any,
        offset: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> RemoteTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            strides=stride,
            storage_offset=offset,
            dtype=dtype,
            device=device,
            requires_grad=False,
            storage_size=FAKE_STORAGE_BYTES,
        )
        r._h = handle
        return r

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or _NO_KWARGS)

    # ---- host-side conveniences that would otherwise read elements directly ------------------

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        host = self.detach().to("cpu")  # a sync point, like printing a CUDA tensor
        extra = f", device='{self.device}'"
        if self.grad_fn is not None:
            extra += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return repr(host)[:-1] + extra + ")"

    def __format__(self, spec: str) -> str:
        if self.dim() == 0:
            return self.item().__format__(spec)
        return repr(self)

    def item(self) -> Any:  # type: ignore[override]
        # Straight to the round trip: `.item()` is the common sync point (loss.item() every
        # step), and the dispatcher's path to `_local_scalar_dense` costs a few µs more.
        if self.numel() != 1:
            raise RuntimeError(f"a Tensor with {self.numel()} elements cannot be converted to Scalar")
        return (_item or _load_item())(self)

    def tolist(self) -> Any:  # type: ignore[override]
        return self.detach().cpu().tolist()

    def numpy(self, *, force: bool = False) -> Any:  # type: ignore[override]
        if not force:
            raise TypeError(
                f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to "
                "copy the tensor to host memory first."
            )
        return self.detach().cpu().numpy()

    def __deepcopy__(self, memo: dict) -> RemoteTensor:
        # Note: torch's Tensor.__deepcopy__ would copy `__dict__` over the clone's, giving the
        # copy the original's handle. The clone gets its own handle; other attributes
        # (e.g. `_is_param` of a custom-tensor Parameter) are copied.
        if id(self) in memo:
            return memo[id(self)]  # type: ignore[no-any-return]
        with torch.no_grad():
            new = self.clone()
        if self.requires_grad and self.is_leaf:
            new.requires_grad_()
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        for k, v in self.__dict__.items():
            if k != "_h":
                setattr(new, k, copy.deepcopy(v, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto: Any) -> Any:
        from gpupool.client.serialization import reduce_remote

        return reduce_remote(self, proto)


_NO_KWARGS: dict[str, Any] = {}


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    """The first op imports the dispatcher (it imports this module) and takes its place."""
    global _dispatch
    from gpupool.client.dispatch import dispatch

    _dispatch = dispatch
    return dispatch(func, args, kwargs)
