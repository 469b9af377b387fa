"""Transparent "cuda": unmodified GPU code, started under `gpupool run`, lands on the pooled GPU.

Every check runs in a real client process — through the `gpupool run` CLI, or with exactly the
environment it gives a command — against a real `gpupool server` process. The server is
CPU-backed and its generator is a CPU one, so device results are compared with the same code on
the CPU, bit for bit where the kernels are the same.

Note [Sections]: starting a client costs an `import torch` and a session a server worker
process (seconds each on 2 cores), so related checks run as sections of one client process per
group; each section runs in its own namespace and is reported (and fails) as its own test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpupool.launcher import command_env
from tests.conftest import ROOT, run_python

RUNNER = r"""
import linecache, sys, traceback
for _name, _code in SECTIONS.items():
    _file = f"<section {_name}>"
    linecache.cache[_file] = (len(_code), None, _code.splitlines(True), _file)
    try:
        exec(compile(_code, _file, "exec"), {"__name__": "__section__"})
    except BaseException:
        print(traceback.format_exc(), flush=True)
        print(f"@@ {_name} FAIL", flush=True)
    else:
        print(f"@@ {_name} OK", flush=True)
"""


class SectionRun:
    """The outcome of one client process that ran several sections (see Note [Sections])."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.proc = proc
        self.results: dict[str, tuple[str, str]] = {}
        buf: list[str] = []
        for line in proc.stdout.splitlines():
            if line.startswith("@@ "):
                _, name, status = line.split()
                self.results[name] = (status, "\n".join(buf))
                buf = []
            else:
                buf.append(line)

    def check(self, name: str) -> str:
        """Assert that section `name` ran and passed; returns what it printed."""
        if name not in self.results:
            pytest.fail(
                f"section {name} did not run (exit {self.proc.returncode})\nstdout:\n"
                f"{self.proc.stdout[-4000:]}\nstderr:\n{self.proc.stderr[-4000:]}"
            )
        status, out = self.results[name]
        assert status == "OK", f"section {name} failed:\n{out}\nstderr:\n{self.proc.stderr[-3000:]}"
        return out


def run_sections(server, sections: dict[str, str], timeout: float = 240) -> SectionRun:
    """Run `sections` in order in one fresh Python with `gpupool run`'s environment."""
    code = f"SECTIONS = {sections!r}\n" + RUNNER
    proc = run_python(code, env=command_env(server.address, server.token), timeout=timeout)
    return SectionRun(proc)


def gpupool_run(server, *cmd: str, env: dict[str, str] | None = None, timeout: float = 120):
    """`gpupool run --server ... --token ... -- CMD` through the real CLI."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.pop("GPUPOOL_SERVER", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gpupool", "run", "--server", server.address, "--token", server.token, "--", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


# ---- 1. bootstrap, through the real CLI ----------------------------------------------------------


def test_cli_installs_client_before_user_code_and_connects_lazily(server, tmp_path: Path) -> None:
    # Another sitecustomize on the path must still run (ours chains to it).
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE_RAN'] = '1'\n")
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            assert os.environ.get("OTHER_SITECUSTOMIZE_RAN") == "1", "chained sitecustomize did not run"
            import torch
            from gpupool.client import session
            assert torch.cuda.is_available() and torch.cuda.device_count() == 1
            assert torch.accelerator.is_available() and torch.accelerator.device_count() == 1
            assert torch.accelerator.current_accelerator().type == "gpupool"
            assert torch.cuda.get_device_capability() >= (8, 0) and torch.cuda.is_bf16_supported()
            assert session.sessions() == [], "a query must not open a session"
            x = torch.arange(6.0, device="cuda").reshape(2, 3)
            assert len(session.sessions()) == 1, "the first device use opens the session"
            assert str(x.device) == "gpupool:0", x.device
            assert x.sum().item() == 15.0
            print("DEVICE", x.device)
            sys.exit(7)
            """
        )
    )
    r = gpupool_run(server, sys.executable, str(script), env={"PYTHONPATH": str(other)})
    assert r.returncode == 7, r.stderr  # the command's exit status comes back
    assert "DEVICE gpupool:0" in r.stdout

    # A Python process that never imports torch pays nothing but the bootstrap's import.
    r = gpupool_run(server, sys.executable, "-c", "import sys; print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"

    r = gpupool_run(server, "/nonexistent/command")
    assert r.returncode == 127
    assert "command not found" in r.stderr


# ---- the sections ---------------------------------------------------------------------------------

QUERIES = """
import torch
from gpupool.client import session
# Seeded before the first device use: the seed must reach the session when it opens.
torch.manual_seed(1234)
got = torch.randn(5, device="cuda").cpu()
torch.manual_seed(1234)
assert torch.equal(got, torch.randn(5)), "the device generator was not seeded"
torch.cuda.manual_seed(77)
a = torch.rand(3, device="cuda").cpu()
torch.cuda.manual_seed_all(77)
assert torch.equal(a, torch.rand(3, device="cuda").cpu())

s = session.sessions()[0]
assert torch.cuda.current_device() == 0 and torch.accelerator.current_device_index() == 0
torch.cuda.set_device(0)
torch.cuda.set_device("cuda:0")
with torch.cuda.device(0):
    assert torch.cuda.current_device() == 0
assert torch.cuda.get_device_name() == torch.cuda.get_device_name(0) == s.device_name
props = torch.cuda.get_device_properties(0)
assert props.name == s.device_name and props.total_memory == s.memory_limit
assert (props.major, props.minor) == torch.cuda.get_device_capability(0)
assert torch.cuda.is_bf16_supported() and torch.cuda.is_initialized()
free, total = torch.cuda.mem_get_info()
assert total == s.memory_limit and 0 < free <= total

torch.cuda.synchronize()
torch.accelerator.synchronize()
# Note: gc first, so temporaries of the ops above that only a reference cycle still holds
# (a client-core issue, see the report) do not fall free in the middle of the count.
import gc; gc.collect()
base = torch.cuda.memory_allocated()
big = torch.empty(1 << 20, device="cuda")  # 4 MiB
used = torch.cuda.memory_allocated()
assert used - base >= 4 << 20, (base, used)
assert torch.cuda.max_memory_allocated() >= used
assert torch.accelerator.memory_allocated() == used
del big
torch.cuda.empty_cache()
assert torch.cuda.memory_allocated() == base, "a dropped tensor still counts"
torch.cuda.reset_peak_memory_stats()
peak = torch.cuda.max_memory_allocated()
assert base <= peak < used, (base, peak, used)
more = torch.empty(2 << 20, device="cuda")  # 8 MiB: a new high
assert torch.cuda.max_memory_allocated() >= base + (8 << 20)
assert torch.cuda.memory_stats()["allocated_bytes.all.current"] == torch.cuda.memory_allocated()
assert "MiB" in torch.cuda.memory_summary()
try:
    torch.cuda.set_device(3)
except RuntimeError as e:
    assert "ordinal" in str(e)
else:
    raise AssertionError("cuda:3 does not exist")
"""


SPELLINGS = """
import torch
cpu = torch.arange(12.0).reshape(3, 4)
made = {
    'device="cuda"': torch.arange(12.0, device="cuda").reshape(3, 4),
    'device="cuda:0"': torch.arange(12.0, device="cuda:0").reshape(3, 4),
    'torch.device("cuda")': torch.arange(12.0, device=torch.device("cuda")).reshape(3, 4),
    'torch.device("cuda", 0)': torch.arange(12.0, device=torch.device("cuda", 0)).reshape(3, 4),
    ".cuda()": cpu.cuda(),
    ".cuda(0)": cpu.cuda(0),
    '.to("cuda")': cpu.to("cuda"),
    ".to(torch.device)": cpu.to(torch.device("cuda:0")),
    ".to(device, dtype)": cpu.double().to("cuda", torch.float32),
    ".to(device=)": cpu.to(device="cuda"),
    ".to(0)": cpu.to(0),
    "torch.tensor": torch.tensor(cpu.tolist(), device="cuda"),
    "torch.as_tensor": torch.as_tensor(cpu, device="cuda"),
    "torch.as_tensor(list)": torch.as_tensor(cpu.tolist(), dtype=torch.float32, device="cuda"),
    "torch.asarray": torch.asarray(cpu.tolist(), device="cuda"),
    "zeros_like+": torch.zeros_like(cpu, device="cuda") + cpu.cuda(),
    "new_zeros+": cpu.new_zeros((3, 4), device="cuda") + cpu.cuda(),
    "new_tensor": cpu.new_tensor(cpu.tolist(), device="cuda"),
    "remote.new_tensor": torch.zeros(1, device="cuda").new_tensor(cpu.tolist()),
    "full": torch.full((3, 4), 0.0, device="cuda") + cpu.cuda(),
}
with torch.device("cuda"):
    made["with torch.device"] = torch.arange(12.0).reshape(3, 4)
torch.set_default_device("cuda")
made["set_default_device"] = torch.arange(12.0).reshape(3, 4)
assert torch.get_default_device().type == "gpupool"
torch.set_default_device("cpu")
assert torch.ones(1).device.type == "cpu"
for how, t in made.items():
    assert t.device == torch.device("gpupool", 0), (how, t.device)
    assert t.is_cuda, how
    assert t.dtype == torch.float32, (how, t.dtype)
    assert torch.equal(t.cpu(), cpu), how
assert not cpu.is_cuda

lin = torch.nn.Linear(4, 2)
ref = lin(cpu)
lin2 = torch.nn.Linear(4, 2)
lin2.load_state_dict(lin.state_dict())
assert lin.cuda().weight.device.type == "gpupool"
assert lin2.to("cuda").weight.device.type == "gpupool"
assert torch.equal(lin(cpu.cuda()).cpu(), ref.detach())
assert torch.equal(lin2(cpu.cuda()).cpu(), ref.detach())
# DataParallel over the one pooled GPU just runs the module there.
dp = torch.nn.DataParallel(torch.nn.Linear(4, 2))
assert dp(cpu).device.type == "gpupool"
"""


THREADS_BACKWARD = """
import threading, concurrent.futures
import torch
import torch.utils.checkpoint as cp

out = []
class Worker(threading.Thread):  # overrides run(): still covered
    def run(self):
        out.append(torch.ones(2, device="cuda").device)
w = Worker(); w.start(); w.join()
t = threading.Thread(target=lambda: out.append(torch.zeros(1).to("cuda").device)); t.start(); t.join()
with concurrent.futures.ThreadPoolExecutor(2) as ex:
    out += list(ex.map(lambda _: torch.empty(1, device="cuda:0").device, range(2)))
assert out == [torch.device("gpupool", 0)] * 4, out

class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2
    @staticmethod
    def backward(ctx, g):
        return g * torch.full((), 2.0, device="cuda")  # "cuda" inside backward

x0 = torch.linspace(-1, 1, 6)
x = x0.clone().cuda().requires_grad_()
Twice.apply(x).sum().backward()
assert torch.equal(x.grad.cpu(), torch.full((6,), 2.0))

seen = []
x.grad = None
h = x.register_hook(lambda g: seen.append(torch.zeros(1, device="cuda").device) or g)
(x * 3).sum().backward()
h.remove()
assert seen == [torch.device("gpupool", 0)], seen

def block(t):  # recomputed inside backward by checkpoint
    return (t * torch.arange(6.0, device="cuda")).sin()
xc = x0.clone().requires_grad_()
block_cpu = (xc * torch.arange(6.0)).sin().sum()
block_cpu.backward()
for reentrant in (False, True):
    x.grad = None
    cp.checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=False).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=0, atol=0)
"""


PINNED = """
import torch
from torch.utils.data import DataLoader, TensorDataset
h = torch.arange(8.0)
p = h.pin_memory()
assert p.is_pinned() and not h.is_pinned() and torch.equal(p, h)
assert p.pin_memory() is p
e = torch.empty(4, pin_memory=True)
assert e.is_pinned() and e.device.type == "cpu"
d = p.to("cuda", non_blocking=True)
assert d.device.type == "gpupool" and not d.is_pinned()
back = d.mul(2).to("cpu", non_blocking=True)
torch.cuda.synchronize()
assert torch.equal(back, h * 2)
dst = torch.empty(8, device="cuda")
dst.copy_(p, non_blocking=True)
assert torch.equal(dst.cpu(), h)

w = torch.full((2,), 0.5, device="cuda")  # the session is open before workers fork
ds = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))
total = 0.0
for xb, yb in DataLoader(ds, batch_size=8, num_workers=2, pin_memory=True):
    assert xb.is_pinned() and yb.is_pinned()
    total += (xb.to("cuda", non_blocking=True) * w).sum().item()
assert total == torch.arange(40.0).sum().item() * 0.5, total
"""


FORK = """
import os, torch
from torch.utils.data import DataLoader, Dataset
import gpupool

x = torch.ones(3, device="cuda")

class TouchesGPU(Dataset):
    def __len__(self): return 2
    def __getitem__(self, i): return torch.ones(1, device="cuda")
try:
    list(DataLoader(TouchesGPU(), num_workers=1))
except Exception as e:
    assert "forked" in str(e) and "spawn" in str(e), e
    print("WORKER-REFUSED")

pid = os.fork()
if pid == 0:  # a child using a tensor it inherited: must never write to the shared socket
    code = 1
    try:
        x.sum().item()
    except gpupool.GpupoolError as e:
        code = 0 if "forked" in str(e) else 2
    os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert torch.cuda._is_in_bad_fork() is False
assert (x * 2).sum().item() == 6.0  # the parent's session is intact
"""


COST = """
import time, torch
from gpupool.client import redirect
a = torch.randn(8, 8, device="cuda"); b = torch.randn(8, 8, device="cuda")
c = a + b
calls = []
orig = redirect.RedirectMode.__torch_function__
def counting(self, func, types, args=(), kwargs=None):
    calls.append(func)
    return orig(self, func, types, args, kwargs)
redirect.RedirectMode.__torch_function__ = counting
c = a + b
d = torch.mm(a, b).relu_()
assert len(calls) == 3, calls  # add, mm, relu_: nothing from the client's own dispatch
redirect.RedirectMode.__torch_function__ = orig
h = torch.randn(16)
for _ in range(200):
    h.add(1)
n = 5000
t0 = time.perf_counter()
for _ in range(n):
    h.dim()
with_mode = (time.perf_counter() - t0) / n
with torch._C.DisableTorchFunction():
    t0 = time.perf_counter()
    for _ in range(n):
        h.dim()
    without = (time.perf_counter() - t0) / n
print(f"mode cost per torch call: {(with_mode - without) * 1e6:.2f} us")
"""


AUTOCAST = """
import torch
import torch.nn.functional as F
torch.manual_seed(0)
a, b = torch.randn(16, 32), torch.randn(32, 8)
w = torch.randn(8, 32, requires_grad=True)
da, db = a.cuda(), b.cuda()
dw = w.detach().cuda().requires_grad_()
bf = torch.bfloat16
with torch.autocast("cuda", dtype=bf):
    assert torch.is_autocast_enabled("cuda") and torch.is_autocast_enabled()
    assert torch.get_autocast_dtype("cuda") == bf
    mm = da @ db                      # lower precision
    lin = F.linear(da, dw)            # lower precision, weight cast (cached)
    lin2 = F.linear(da, dw)
    sm = torch.softmax(mm, dim=-1)    # fp32 (set_opt_dtype)
    ex = torch.exp(mm)                # fp32
    ln = F.layer_norm(mm, (8,))       # fp32
    s = mm.sum()                      # fp32 (set_opt_dtype)
    n = torch.norm(mm)                # fp32 (append_dtype)
    ac = torch.addcmul(da[:, :8], mm, mm)  # promote: fp32 + bf16 -> fp32
    ac16 = torch.addcmul(mm, mm, mm)       # promote: all bf16 -> bf16
    r = mm.relu()                     # not listed: input dtype kept
    q = da.reshape(1, 2, 16, 16)
    att = F.scaled_dot_product_attention(q, q, q, is_causal=True)  # lower precision
    sm64 = torch.softmax(mm.double(), -1)  # float64 is never cast
    try:
        F.binary_cross_entropy(torch.rand(3, device="cuda"), torch.rand(3, device="cuda"))
    except RuntimeError as e:
        assert "unsafe to autocast" in str(e)
    else:
        raise AssertionError("binary_cross_entropy must be refused under autocast")
assert not torch.is_autocast_enabled("cuda")
assert mm.dtype == lin.dtype == ac16.dtype == r.dtype == bf
assert sm.dtype == ex.dtype == ln.dtype == s.dtype == n.dtype == ac.dtype == torch.float32
assert sm64.dtype == torch.float64
# The ops really ran in bf16 on the server: bit-equal to bf16 on the CPU.
assert torch.equal(mm.cpu(), a.to(bf) @ b.to(bf))
assert torch.equal(lin.cpu(), F.linear(a.to(bf), w.detach().to(bf)))
assert torch.equal(sm.cpu(), torch.softmax((a.to(bf) @ b.to(bf)).float(), -1))
qb = a.reshape(1, 2, 16, 16).to(bf)
assert att.dtype == bf, att.dtype
assert torch.equal(att.cpu(), F.scaled_dot_product_attention(qb, qb, qb, is_causal=True))
# Gradients flow through the casts back to the fp32 weight.
(lin.float().sum() + lin2.float().sum()).backward()
with torch.autocast("cpu", dtype=bf):
    ref = F.linear(a, w)
(2 * ref.float().sum()).backward()
assert dw.grad.dtype == torch.float32
torch.testing.assert_close(dw.grad.cpu(), w.grad, rtol=0, atol=0)

with torch.cuda.amp.autocast():  # CUDA's default dtype: fp16
    assert (da @ db).dtype == torch.float16
@torch.autocast("cuda", dtype=bf)
def f(x, y):
    return x @ y
assert f(da, db).dtype == bf

class Fp32Only(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x):
        return x * 1
    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        return g
with torch.autocast("cuda", dtype=bf):
    assert Fp32Only.apply(da.to(bf)).dtype == torch.float32
"""


GRADSCALER = """
import warnings
import torch
warnings.simplefilter("ignore", FutureWarning)
old = torch.cuda.amp.GradScaler()
assert old.is_enabled() and old._device == "gpupool"

torch.manual_seed(0)
x, y = torch.randn(32, 4), torch.randn(32, 1)
m_cpu = torch.nn.Linear(4, 1)
m = torch.nn.Linear(4, 1)
m.load_state_dict(m_cpu.state_dict())
m.cuda()
opt = torch.optim.SGD(m.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
assert scaler.is_enabled()
opt_cpu = torch.optim.SGD(m_cpu.parameters(), lr=0.1)
scaler_cpu = torch.amp.GradScaler("cpu", init_scale=1024.0)
for step in range(3):
    for model, o, sc, dev in ((m, opt, scaler, "cuda"), (m_cpu, opt_cpu, scaler_cpu, "cpu")):
        loss = torch.nn.functional.mse_loss(model(x.to(dev)), y.to(dev))
        o.zero_grad()
        sc.scale(loss).backward()
        if step == 1:  # an overflowing gradient: the step must be skipped
            model.weight.grad[0, 0] = float("inf")
        sc.step(o)
        sc.update()
assert scaler.get_scale() == scaler_cpu.get_scale() == 512.0 * 1.0, scaler.get_scale()
assert scaler._scale.device.type == "gpupool"
torch.testing.assert_close(m.weight.detach().cpu(), m_cpu.weight.detach(), rtol=0, atol=0)
"""


COMPILE = """
import torch
m = torch.nn.Linear(3, 2).cuda()
cm = torch.compile(m)
cm2 = torch.compile(m, mode="max-autotune")
@torch.compile
def f(x):
    return x * 2 + 1
@torch.compile(fullgraph=True)
def g(x):
    return x - 1
x = torch.ones(4, 3, device="cuda")
assert torch.equal(cm(x).cpu(), m(x).cpu()) and torch.equal(cm2(x).cpu(), m(x).cpu())
assert torch.equal(f(x).cpu(), torch.full((4, 3), 3.0))
assert torch.equal(g(x).cpu(), torch.zeros(4, 3))
m.compile()
assert torch.equal(m(x).cpu(), cm(x).cpu())
"""


UNSUPPORTED = """
import torch, gpupool
attempts = {
    "Stream": lambda: torch.cuda.Stream(),
    "Event": lambda: torch.cuda.Event(enable_timing=True),
    "CUDAGraph": lambda: torch.cuda.CUDAGraph(),
    "graph": lambda: torch.cuda.graph(None),
    "make_graphed_callables": lambda: torch.cuda.make_graphed_callables(torch.nn.Linear(1, 1), (torch.ones(1),)),
    "nccl": lambda: torch.distributed.init_process_group(
        backend="nccl", init_method="tcp://127.0.0.1:9", rank=0, world_size=1),
    "nccl-positional": lambda: torch.distributed.init_process_group("nccl"),
}
from torch.utils import cpp_extension  # imported after start-up: patched on import
attempts["load_inline"] = lambda: cpp_extension.load_inline(
    "ext", cpp_sources="", cuda_sources="__global__ void k() {}")
attempts["load(.cu)"] = lambda: cpp_extension.load("ext2", ["kernel.cu"])
attempts["CUDAExtension"] = lambda: cpp_extension.CUDAExtension("ext3", ["k.cu"])
for what, attempt in attempts.items():
    try:
        attempt()
    except gpupool.UnsupportedError as e:
        assert "pooled" in str(e), (what, e)
        print("UNSUPPORTED", what)
    else:
        raise AssertionError(f"{what} did not fail")
# Libraries' no-op uses of the one stream keep working.
s = torch.cuda.current_stream()
assert s == torch.cuda.default_stream() and isinstance(s, torch.cuda.Stream)
x = torch.ones(2, device="cuda")
with torch.cuda.stream(s):
    y = x + 1
s.synchronize()
s.wait_stream(torch.cuda.current_stream())
assert s.query() and not torch.cuda.is_current_stream_capturing()
torch.cuda.nvtx.range_push("step"); torch.cuda.nvtx.range_pop()
with torch.cuda.nvtx.range("fwd"):
    y = y * 2
assert y.sum().item() == 8.0
"""


POLICY = """
import torch
from gpupool.client import autocast
ours = {"aten::" + n for n in autocast.all_policy_ops()}
cuda = {n for n in torch._C._dispatch_get_all_op_names()
        if torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")}
assert ours == cuda, (sorted(ours - cuda), sorted(cuda - ours))
missing = [n for n in sorted(ours)
           if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastPrivateUse1")]
assert not missing, missing
print("POLICY OPS", len(ours))
"""


@pytest.fixture(scope="module")
def redirect_run(server) -> SectionRun:
    # QUERIES first: it checks that a seed set before the first device use reaches the session.
    return run_sections(
        server,
        {"QUERIES": QUERIES, "SPELLINGS": SPELLINGS, "THREADS_BACKWARD": THREADS_BACKWARD,
         "PINNED": PINNED, "FORK": FORK, "COST": COST},
    )


@pytest.fixture(scope="module")
def amp_run(server) -> SectionRun:
    return run_sections(server, {"AUTOCAST": AUTOCAST, "GRADSCALER": GRADSCALER, "POLICY": POLICY})


RNG = """
import torch
import torch.utils.checkpoint as cp
# The device generator's state moves between client and server like a CUDA generator's.
torch.manual_seed(3)
state = torch.cuda.get_rng_state()
assert state.dtype == torch.uint8 and state.device.type == "cpu" and state.numel() > 0
a = torch.rand(5, device="cuda").cpu()
torch.cuda.set_rng_state(state)
b = torch.rand(5, device="cuda").cpu()
assert torch.equal(a, b), (a, b)
with torch.random.fork_rng(device_type="cuda"):
    torch.rand(100, device="cuda")
c = torch.rand(5, device="cuda").cpu()
torch.cuda.set_rng_state(state)
torch.rand(5, device="cuda")
assert torch.equal(c, torch.rand(5, device="cuda").cpu())  # fork_rng restored the state
# Dropout inside a checkpointed block draws the same mask when recomputed in backward.
w = torch.randn(64, 64, device="cuda", requires_grad=True)
x = torch.randn(8, 64, device="cuda", requires_grad=True)
def block(t):
    return torch.nn.functional.dropout(t @ w, 0.5, training=True)
for reentrant in (False, True):
    torch.manual_seed(11)
    w.grad = None
    block(x).pow(2).sum().backward()
    plain = w.grad.cpu()
    torch.manual_seed(11)
    w.grad = None
    cp.checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=True).pow(2).sum().backward()
    torch.testing.assert_close(w.grad.cpu(), plain, rtol=0, atol=0)
print("RNG OK")
"""


@pytest.fixture(scope="module")
def limits_run(server) -> SectionRun:
    return run_sections(server, {"COMPILE": COMPILE, "UNSUPPORTED": UNSUPPORTED, "RNG": RNG})


def test_device_rng_state_roundtrips_and_checkpoint_preserves_it(limits_run: SectionRun) -> None:
    limits_run.check("RNG")


def test_cuda_checkpoint_loads_back_onto_the_pooled_gpu_in_a_new_process(server, tmp_path: Path) -> None:
    """Saved from "cuda" code under `gpupool run`; loaded by another run whose first device use
    is `torch.load` (the session must open for it)."""
    ckpt = tmp_path / "model.pt"
    save = tmp_path / "save.py"
    save.write_text(textwrap.dedent(f"""
        import torch
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3).cuda()
        torch.save({{"model": m.state_dict(), "whole": m}}, {str(ckpt)!r})
        print("SUM", float(m.weight.sum()))
    """))
    load = tmp_path / "load.py"
    load.write_text(textwrap.dedent(f"""
        import torch
        ck = torch.load({str(ckpt)!r}, weights_only=False)
        w = ck["model"]["weight"]
        assert w.device.type == "gpupool", w.device
        assert ck["whole"].weight.device.type == "gpupool"
        print("SUM", float(w.sum()))
        sd = torch.load({str(ckpt)!r}, map_location="cpu", weights_only=False)["model"]
        assert sd["weight"].device.type == "cpu"
    """))
    r1 = gpupool_run(server, sys.executable, str(save))
    assert r1.returncode == 0, r1.stderr
    r2 = gpupool_run(server, sys.executable, str(load))
    assert r2.returncode == 0, r2.stderr
    assert r1.stdout.split("SUM")[1].strip() == r2.stdout.split("SUM")[1].strip()


# ---- 2. redirection ----------------------------------------------------------------------------------


def test_cuda_queries_answer_for_the_pooled_gpu(redirect_run: SectionRun) -> None:
    redirect_run.check("QUERIES")


def test_every_cuda_spelling_lands_on_the_pooled_device(redirect_run: SectionRun) -> None:
    redirect_run.check("SPELLINGS")


def test_threads_and_backward_see_the_redirect(redirect_run: SectionRun) -> None:
    redirect_run.check("THREADS_BACKWARD")


def test_pin_memory_non_blocking_and_dataloader(redirect_run: SectionRun) -> None:
    redirect_run.check("PINNED")


def test_forked_child_is_refused_clearly_and_parent_carries_on(redirect_run: SectionRun) -> None:
    assert "WORKER-REFUSED" in redirect_run.check("FORK")


def test_redirect_mode_does_one_cheap_call_per_torch_call(redirect_run: SectionRun) -> None:
    """The global mode adds one __torch_function__ call per torch call, none inside dispatch."""
    print(redirect_run.check("COST"))


# ---- 3. autocast and GradScaler -------------------------------------------------------------------


def test_autocast_cuda_bf16_runs_cuda_policy_on_the_server(amp_run: SectionRun) -> None:
    amp_run.check("AUTOCAST")


def test_gradscaler_cuda_scales_skips_inf_steps_and_matches_cpu(amp_run: SectionRun) -> None:
    amp_run.check("GRADSCALER")


def test_autocast_policy_covers_exactly_cudas_op_lists(amp_run: SectionRun) -> None:
    """The AutocastPrivateUse1 kernels cover the very ops torch registers for AutocastCUDA."""
    assert "POLICY OPS 119" in amp_run.check("POLICY")


# ---- 4./5. torch.compile and what cannot work ------------------------------------------------------


def test_torch_compile_runs_eagerly_with_one_notice(limits_run: SectionRun) -> None:
    limits_run.check("COMPILE")
    stderr = limits_run.proc.stderr
    assert stderr.count("torch.compile is not supported on a pooled GPU") == 1, stderr


def test_what_cannot_work_fails_with_unsupported_error_not_a_crash(limits_run: SectionRun) -> None:
    out = limits_run.check("UNSUPPORTED")
    assert out.count("UNSUPPORTED ") == 10, out
    assert limits_run.proc.returncode == 0, limits_run.proc.stderr
