"""The controller's HTTP edge under attack (issue 10, "On the controller"): bodies before tokens,
bodies past the cap, a token hammering the API, guessed tokens, numbers that are not numbers, and
what the CLI prints for them. Each attack is performed for real: a controller process (so its
memory can be read from /proc) or a controller thread, over HTTP on loopback."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gpupool.controller import scheduler as sched
from gpupool.controller.app import MIN_SHARE_BYTES
from gpupool.controller.client import _error_for
from gpupool.controller.edge import bearer_token
from gpupool.controller.ratelimit import Buckets
from gpupool.controller.store import request_from_json, request_to_json
from gpupool.controller.testing import ADMIN_TOKEN, GiB, Pool
from tests.pool_fixtures import ADMIN, cli, start_controller

MiB = 2**20
CAP = 64 * 1024  # Settings.max_body_bytes


# -- a raw HTTP client that keeps sending while it listens -----------------------------------------


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict[str, str]
    sent: int  # body bytes written into the socket before the answer came
    seconds: float
    closed: bool  # the controller closed the connection after answering


def post_streaming(url: str, path: str, token: str | None, total: int, chunked: bool = True,
                   declared: int | None = None, limit_s: float = 60) -> Answer:
    """POST `total` bytes of body in 1 MiB pieces (chunked, or with a Content-Length of `declared`),
    reading the answer as soon as it comes, and stop sending then. An httpx client would block in
    its write once the controller stops reading, and may lose an early answer to the reset."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setblocking(False)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {declared or total}\r\n"
    out = bytearray((head + "\r\n").encode())
    head_size = len(out)
    piece = b" " * MiB
    piece = (b"%x\r\n" % MiB + piece + b"\r\n") if chunked else piece
    sent = queued = 0
    got = b""
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s:
            if not out and queued < total:
                out += piece
                queued += MiB
                if chunked and queued >= total:
                    out += b"0\r\n\r\n"
            r, w, _ = select.select([s], [s] if out else [], [], 1.0)
            if r:
                data = s.recv(1 << 16)
                if not data:
                    break
                got += data
                if _complete(got):
                    break
            if w and out:
                try:
                    n = s.send(out)
                except (BrokenPipeError, ConnectionResetError):
                    out.clear()
                    queued = total
                    continue
                del out[:n]
                sent += n
        seconds = time.monotonic() - t0
        assert _complete(got), f"no answer in {limit_s} s (sent {sent} bytes): {got[:300]!r}"
        closed = _closed_soon(s)
    finally:
        s.close()
    head_bytes, _, body = got.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return Answer(int(lines[0].split()[1]), json.loads(body), headers, max(0, sent - head_size), seconds, closed)


def _complete(got: bytes) -> bool:
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    lengths = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")]
    return bool(lengths) and len(body) >= lengths[0]


def _closed_soon(s: socket.socket, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if select.select([s], [], [], 0.5)[0]:
            try:
                if not s.recv(1 << 16):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
    return False


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# -- attack 1: big bodies before (and after) authentication ---------------------------------------


@pytest.fixture(scope="module")
def ctl_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, str]]:
    """A `gpupool controller` process: (pid, url, a user token)."""
    home = tmp_path_factory.mktemp("edge")
    proc, url = start_controller(home)
    try:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        token = admin.post("/v1/tokens", json={"user": "alice"}).json()["token"]
        for _ in range(3):  # warm up: what a first request imports and caches is not the attack's growth
            admin.get("/v1/status").raise_for_status()
            httpx.post(url + "/v1/leases", json={"fraction": 0.5}, headers={"Authorization": f"Bearer {token}"})
        admin.close()
        yield proc.proc.pid, url, token
    finally:
        proc.stop()


@pytest.mark.parametrize("token", [None, "gpt_not-the-right-token-at-all", "two words"])
def test_200mib_chunked_body_without_a_valid_token_is_refused_before_it_is_read(
        ctl_proc: tuple[int, str, str], token: str | None) -> None:
    pid, url, _ = ctl_proc
    before = rss(pid)
    a = post_streaming(url, "/v1/leases", token, 200 * MiB)
    grew = rss(pid) - before
    assert a.status == 401 and a.body["code"] == "unauthorized" and a.headers["www-authenticate"] == "Bearer", a
    assert a.seconds < 10 and a.sent < 64 * MiB, a  # what loopback socket buffers hold, not 200 MiB
    assert grew < 50 * MiB, f"the controller grew by {grew / MiB:.0f} MiB"
    assert a.closed, "the connection stays open: the rest of the body would be read and thrown away"


def test_200mib_chunked_body_with_a_valid_token_is_cut_at_the_cap(ctl_proc: tuple[int, str, str]) -> None:
    pid, url, token = ctl_proc
    before = rss(pid)
    a = post_streaming(url, "/v1/leases", token, 200 * MiB)
    grew = rss(pid) - before
    assert a.status == 413 and a.body == {"code": "too_large", "message": f"request bodies are limited to {CAP} bytes"}
    assert a.seconds < 10 and a.sent < 64 * MiB and grew < 50 * MiB, (a, grew / MiB)
    assert a.closed


@pytest.mark.parametrize("token", [None, "admin"])
def test_declared_200mib_content_length_gets_413_before_any_body_is_sent(
        ctl_proc: tuple[int, str, str], token: str | None) -> None:
    _, url, _ = ctl_proc
    a = post_streaming(url, "/v1/servers", ADMIN if token else None, 0, chunked=False, declared=200 * MiB)
    assert a.status == 413 and a.body["code"] == "too_large" and a.sent == 0 and a.closed, a


def test_bodies_under_the_cap_and_public_endpoints_still_work(ctl_proc: tuple[int, str, str]) -> None:
    _, url, token = ctl_proc
    auth = {"Authorization": f"Bearer {token}"}

    def pieces() -> Iterator[bytes]:  # chunked (no length), as a streaming client sends it
        yield b'{"fraction": '
        yield b"0.5}"

    r = httpx.post(url + "/v1/leases", content=pieces(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 409 and r.json()["code"] == "unsatisfiable", r.text  # read, parsed, scheduled
    r = httpx.post(url + "/v1/leases", json={"fraction": 0.5, "labels": {"k": "v" * 200}}, headers=auth)
    assert r.status_code == 409, r.text
    r = httpx.post(url + "/v1/leases", content=b" " * (CAP - 20) + b'{"n": 1}', headers={**auth, "content-type": "application/json"})
    assert r.status_code == 409, r.text  # just under the cap
    for path in ("/healthz", "/openapi.json", "/docs", "/redoc"):
        assert httpx.get(url + path).status_code == 200, path
    assert httpx.get(url + "/v1/whoami", headers=auth).json()["user"] == "alice"


# -- attack 2: hammering with one token, guessing tokens --------------------------------------------


def test_buckets_allow_a_burst_then_the_rate() -> None:
    b = Buckets(rate=2, burst=3)
    assert [b.take("t", 0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take("t", 0.0) == pytest.approx(0.5)  # refused: a token in half a second
    assert b.wait("t", 0.25) == pytest.approx(0.25) and b.take("other", 0.0) == 0
    assert b.take("t", 0.5) == 0 and b.take("t", 0.5) > 0
    assert b.take("t", 100.0) == 0 and [b.take("t", 100.0) for _ in range(3)] == [0, 0, pytest.approx(0.5)]
    with pytest.raises(ValueError):
        Buckets(rate=0, burst=1)


def test_buckets_table_stays_bounded() -> None:
    """Note [Bounded buckets]: full buckets are dropped first; if none is full, all are."""
    b = Buckets(rate=1, burst=2, max_keys=10)
    for i in range(10):
        b.take(i, 0.0)
    b.take("busy", 5.0)  # every earlier bucket has refilled by now: they go
    assert len(b) == 1
    for i in range(9):
        b.take(i, 5.0)
    b.take("new", 5.0)  # all ten are refilling: the table is cleared, the new key kept
    assert len(b) == 1 and b.wait(0, 5.0) == 0


def test_a_token_over_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    with Pool(tmp_path, rate_per_s=2.0, rate_burst=5) as pool:
        alice, bob = pool.user("alice"), pool.user("bob")
        codes = [alice.get("/v1/whoami").status_code for _ in range(5)]
        r = alice.post("/v1/leases", json={"fraction": 0.5})
        assert codes == [200] * 5 and r.status_code == 429, r.text
        assert r.json()["code"] == "rate_limited" and "rate limit" in r.json()["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert bob.get("/v1/whoami").status_code == 200  # per token
        assert all(pool.admin.get("/v1/whoami").status_code == 200 for _ in range(50))  # admins exempt
        time.sleep(int(r.headers["retry-after"]))
        assert alice.get("/v1/whoami").status_code == 200


def test_a_peer_guessing_tokens_is_slowed_but_known_tokens_pass(tmp_path: Path) -> None:
    with Pool(tmp_path, auth_failures_per_s=0.01, auth_failure_burst=3, token_cache_s=600) as pool:
        alice = pool.user("alice")
        assert alice.get("/v1/whoami").status_code == 200  # now known good (cached)
        carol_token = pool.token("carol")
        guesses = [pool.client(f"gpt_guess-{i}").get("/v1/whoami") for i in range(5)]
        assert [g.status_code for g in guesses] == [401, 401, 401, 429, 429], [g.text for g in guesses]
        assert guesses[-1].json()["code"] == "rate_limited" and "retry-after" in guesses[-1].headers
        assert alice.get("/v1/whoami").status_code == 200
        # Carol's token was never checked here: it waits with the guesses (the price of the limit).
        assert pool.client(carol_token).get("/v1/whoami").status_code == 429


# -- attack 3: numbers that are not numbers, shares of nothing ------------------------------------


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    with Pool(tmp_path) as p:
        yield p


def test_strings_nan_infinity_and_tiny_shares_get_422_naming_the_field(pool: Pool) -> None:
    pool.register("gpu1", 8 * GiB)
    alice = pool.user("alice")
    raw = {"content-type": "application/json"}
    cases: list[tuple[httpx.Response, str, str]] = [
        (alice.post("/v1/leases", json={"n": "1"}), "n", "valid integer"),
        (alice.post("/v1/leases", json={"n": 1.0}), "n", "valid integer"),
        (alice.post("/v1/leases", json={"fraction": "0.5"}), "fraction", "valid number"),
        (alice.post("/v1/leases", content=b'{"fraction": NaN}', headers=raw), "fraction", "finite number"),
        (alice.post("/v1/leases", content=b'{"ttl_s": Infinity}', headers=raw), "ttl_s", "finite number"),
        (alice.post("/v1/leases", content=b'{"wait_s": 1e999}', headers=raw), "wait_s", "finite number"),
        (alice.post("/v1/leases", json={"fraction": 1e-300}), "fraction", "under 1 MiB on any GPU"),
        (alice.post("/v1/leases", json={"memory_bytes": 1000}), "memory_bytes", "at least 1048576"),
        (alice.post("/v1/leases", json={"spread": 1}), "spread", "valid boolean"),
        (alice.post("/v1/leases", json={"priority": "0"}), "priority", "valid integer"),
        (alice.post("/v1/leases/l-x/renew", json={"ttl_s": "60"}), "ttl_s", "valid number"),
        (pool.admin.post("/v1/servers/gpu1/heartbeat", json={"gpus": [{"index": "0"}]}), "gpus.0.index", "integer"),
        (pool.admin.post("/v1/tokens", json={"user": "x", "ttl_s": "60"}), "ttl_s", "valid number"),
        (pool.admin.put("/v1/users/alice/quota", content=b'{"quota_gpus": NaN}', headers=raw), "quota_gpus", "finite"),
    ]
    for r, field, words in cases:
        assert r.status_code == 422, (r.request.content, r.text)
        body = r.json()
        assert body["code"] == "invalid_request" and f"{field}: " in body["message"] and words in body["message"], body
        assert any(".".join(str(x) for x in e["loc"][1:]) == field for e in body["errors"]), body
    assert alice.post("/v1/leases", json={"memory_bytes": MIN_SHARE_BYTES, "ttl_s": 60}).status_code == 201


def test_a_fraction_under_1mib_of_every_gpu_is_refused_and_of_some_avoids_them(pool: Pool) -> None:
    pool.register("small", 512 * MiB)
    alice = pool.user("alice")
    r = alice.post("/v1/leases", json={"fraction": 0.001})  # 0.5 MiB of the only GPU
    assert r.status_code == 409 and r.json()["code"] == "unsatisfiable", r.text
    assert "under 1.0 MiB on every GPU" in r.json()["message"] and "larger fraction" in r.json()["message"]
    pool.register("big", 8 * GiB)
    r = alice.post("/v1/leases", json={"fraction": 0.001, "ttl_s": 60})
    assert r.status_code == 201 and r.json()["server"] == "big" and r.json()["bytes_per_gpu"][0] >= MiB, r.text


def test_least_share_is_kept_in_queued_requests() -> None:
    req = sched.Request(1, sched.Share.of(0.001, min_bytes=MiB))
    assert request_from_json(request_to_json(req)) == req
    old = request_to_json(req)
    del old["share"]["min_bytes"]  # an entry queued before the floor existed
    assert request_from_json(old).share.min_bytes == 0
    snap = sched.Snapshot((sched.ServerView("s", "s", "h:1", (sched.GpuView("s-0", 0, 512 * MiB),)),))
    assert sched.place(req, snap) is None and not sched.feasible(req, snap)
    assert sched.place(sched.Request(1, sched.Share.of(0.001)), snap) is not None  # no floor: placed


# -- attack 4: what the CLI prints ---------------------------------------------------------------


def test_422_errors_become_sentences_for_every_caller() -> None:
    errors = [{"loc": ["body", "fraction"], "msg": "Input should be a finite number", "type": "finite_number",
               "input": "nan"},
              {"loc": ["body", "n"], "msg": "Input should be a valid integer", "type": "int_type", "input": '"1"'},
              {"loc": ["body", "gpus"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden", "input": "1"},
              {"loc": ["body", "memory_bytes"], "msg": "memory_bytes must be at least 1048576 (1 MiB), not 5",
               "type": "value_error", "input": "5"}]
    e = _error_for(422, "invalid_request", "invalid request: ...", errors)
    assert str(e) == ('fraction must be a finite number (got nan); n must be a valid integer (got "1"); '
                      "gpus is not something this request takes (got 1); "
                      "memory_bytes must be at least 1048576 (1 MiB), not 5")
    assert str(_error_for(422, "invalid_request", "as it was", None)) == "as it was"


@pytest.fixture(scope="module")
def cli_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    home = tmp_path_factory.mktemp("cli")
    proc, url = start_controller(home)
    yield home, url
    proc.stop()


@pytest.mark.parametrize(("args", "sentence"), [
    (["run", "-p", "nan", "--", sys.executable, "-c", "1"], "fraction must be a finite number between 0 and 1 (got nan)"),
    (["run", "-p", "inf", "--", sys.executable, "-c", "1"], "fraction must be a finite number between 0 and 1 (got inf)"),
    (["run", "-n", "0", "--", sys.executable, "-c", "1"], "-n must be at least 1 GPU (got 0)"),
    (["run", "--wait", "nan", "-p", "0.5", "--", sys.executable, "-c", "1"], "--wait must be a finite number"),
    (["run", "--ttl", "nan", "-p", "0.5", "--", sys.executable, "-c", "1"], "--ttl must be a finite number"),
    (["request", "-p", "nan"], "fraction must be a finite number between 0 and 1 (got nan)"),
    (["request", "-m", "1KiB"], "-m must be at least 1MiB (got 1KiB)"),
    # These pass the CLI's own checks: the sentence is made of the controller's 422.
    (["request", "-p", "1e-300"], "fraction must be at least 9.31e-10 (got 1e-300): a smaller share is under 1 MiB"),
    (["request", "-p", "0.5", "--ttl", "99999999d"], "ttl_s must be less than or equal to 2592000"),
])
def test_cli_shows_bad_numbers_as_one_sentence(cli_pool: tuple[Path, str], args: list[str], sentence: str) -> None:
    home, url = cli_pool
    r = cli(home, url, *args, timeout=120)
    assert r.returncode not in (0, None), r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpupool: {sentence}"), r.stderr
    assert "{" not in r.stderr and "Traceback" not in r.stderr and not r.stdout.strip(), r


def test_cli_ttl_must_be_a_duration(cli_pool: tuple[Path, str]) -> None:
    home, url = cli_pool
    r = cli(home, url, "request", "-p", "0.5", "--ttl", "nan")
    assert r.returncode == 2 and r.stderr.strip() == "gpupool: not a duration: 'nan' (try 90s, 30m, 2h, 1d)", r.stderr


def test_bearer_header_syntax() -> None:
    for good in (ADMIN_TOKEN, ADMIN, "gpt_" + "A-z_0.9~+/" * 10 + "=="):
        assert bearer_token([(b"authorization", b"Bearer " + good.encode())]) == good
        assert bearer_token([(b"authorization", b"bearer  " + good.encode())]) == good
    for bad in (b"Bearer", b"Bearer ", b"Basic YWRtaW4=", b"Bearer two words", b"Bearer x\x00y",
                b"Bearer " + b"a" * 513, ADMIN.encode()):
        assert bearer_token([(b"authorization", bad)]) is None, bad
    assert bearer_token([(b"host", b"x")]) is None
