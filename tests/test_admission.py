"""`admission.admit`, the listener's one decision, called directly on plain data (it does no I/O):
who may open a session or a hold, on which device, with which budget (Note [Lease binding])."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpupool.errors import LeaseError
from gpupool.protocol import messages as m
from gpupool.server.admission import Grant, Holdings, Limits, Refusal, admit
from gpupool.server.device import DeviceInfo

GiB = 1024**3
DEVICES = [DeviceInfo(0, "cpu", "cpu0", 8 * GiB, "cpu-uuid-0"), DeviceInfo(1, "cpu", "cpu1", 8 * GiB, "cpu-uuid-1")]
LIMITS = Limits(protocol=3, max_sessions=2, max_holds=1)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    bytes: int


@dataclass(frozen=True)
class Claims:
    id: str
    gpus: tuple[Gpu, ...]
    expires_at: float = 1e12


def verify(text: str) -> Claims:
    """Leases as the server agent would check them: "good" is valid for GPU 1 (2 GiB)."""
    if text == "good":
        return Claims("L1", (Gpu(1, "cpu-uuid-1", 2 * GiB),))
    if text == "elsewhere":  # signed for a GPU of another server sharing this one's address
        return Claims("L2", (Gpu(1, "other-server-uuid", GiB),))
    raise LeaseError("lease was forged")


def hello(**kw: object) -> m.Hello:
    base: dict[str, object] = {"protocol": 3, "token": ""}
    base.update(kw)
    return m.Hello(**base)  # type: ignore[arg-type]


NOTHING = Holdings()


def decide(h: m.Hello, holdings: Holdings = NOTHING, token: str = "", pool: bool = True) -> Grant | Refusal:
    return admit(h, DEVICES, token, verify if pool else None, holdings, LIMITS)


def test_a_valid_lease_gets_its_gpu_and_its_bytes() -> None:
    g = decide(hello(lease="good"))
    assert isinstance(g, Grant) and g.device == DEVICES[1] and g.limit == 2 * GiB and g.lease_id == "L1"
    assert not g.hold


def test_a_lease_for_a_gpu_this_server_does_not_have_is_refused() -> None:
    """The attack: a server token registered a second server at this server's address, and
    this server honoured the leases granted on the fake one (they named the same index)."""
    r = decide(hello(lease="elsewhere"))
    assert isinstance(r, Refusal) and r.code == "lease" and "does not have" in r.message


@pytest.mark.parametrize("h, code, text", [
    (hello(lease="forged"), "lease", "forged"),
    (hello(lease="good", gpu=3), "lease", "GPU 3 asked for"),
    (hello(protocol=2, lease="good"), "version", "protocol 2"),
    (hello(token="guess"), "auth", "no lease and no valid token"),
    (hello(hold=True, token="t"), "lease", "needs a lease"),
])
def test_refusals(h: m.Hello, code: str, text: str) -> None:
    r = decide(h, token="t")
    assert isinstance(r, Refusal) and r.code == code and text in r.message


def test_a_lease_whose_holder_went_away_is_refused_here() -> None:
    r = decide(hello(lease="good"), Holdings(ended_leases=frozenset({"L1"})))
    assert isinstance(r, Refusal) and "has ended" in r.message


def test_limits_count_sessions_and_holds_apart() -> None:
    assert isinstance(decide(hello(lease="good"), Holdings(sessions=2)), Refusal)
    assert isinstance(decide(hello(lease="good", hold=True), Holdings(sessions=2)), Grant)
    r = decide(hello(lease="good", hold=True), Holdings(holds=1))
    assert isinstance(r, Refusal) and r.code == "busy"


def test_static_token_mode() -> None:
    g = decide(hello(token="secret"), token="secret", pool=False)
    assert isinstance(g, Grant) and g.device is None and g.limit is None and not g.lease_id
    r = decide(hello(token="wrong"), token="secret", pool=False)
    assert isinstance(r, Refusal) and r.code == "auth" and "invalid token" in r.message
    assert isinstance(decide(hello(token=""), token="", pool=False), Refusal)  # no token set: no entry
