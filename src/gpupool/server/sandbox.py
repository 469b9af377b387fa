"""A Linux process sandbox applied with ctypes: Landlock for files, TCP and signals, seccomp
for the rest (Note [Worker sandbox] in worker.py says why the session worker needs one).

The threat: a kernel fed crafted arguments corrupts memory, and an attacker who can do that can
run code of their choosing inside the worker. After `restrict()` such code still owns the
worker's memory, its GPU and the sockets it was given, but:

- files: it can read (and map as code) only beneath the `read_only` paths, and read, write and
  ioctl only the `devices`; any other open fails with EACCES (Landlock, every access right the
  kernel's ABI knows handled, so none is left unrestricted);
- network: it cannot create a socket (seccomp: socket, socketpair), nor bind, connect, listen
  or accept (seccomp, and Landlock's TCP rules where ABI >= 4); sockets it holds keep working;
- processes: no fork, vfork, execve, execveat, and no clone without CLONE_THREAD (threads keep
  working); clone3 answers ENOSYS, since its flags sit in memory a filter cannot read, and glibc
  then falls back to clone;
- other processes: no ptrace, process_vm_readv/writev, pidfd_*, kcmp; kill, tgkill and
  rt_(tg)sigqueueinfo only towards its own pid, tkill not at all; Landlock scopes (ABI >= 6)
  also stop signals and abstract Unix sockets leaving the domain;
- kernel surface: io_uring (its operations bypass seccomp), bpf, perf_event_open, userfaultfd,
  keyrings, mounts and the new mount API, namespaces, chroot, open_by_handle_at, modules,
  kexec, reboot, swap, acct, quotactl, modify_ldt/iopl/ioperm, memfd_secret are refused.

Note: seccomp here is a deny-list, not an allow-list: CUDA's user-space driver makes many
ioctls and system calls that differ between driver releases, and an allow-list cannot be
proven complete without a GPU to test on; what must not happen is enumerated instead, and
unknown architectures get no filter (reported as missing). Denied calls fail with an errno
(EPERM; ENOSYS for clone3), not a kill, so Python raises an ordinary OSError.

Note: Landlock restricts the calling thread and the threads it creates afterwards, not threads
that already run; `restrict()` therefore refuses to run in a process with other threads
(`allow_threads` overrides, for tests). seccomp is applied to all threads (TSYNC).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# ---- kernel constants -----------------------------------------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_SECCOMP = 21
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

# Landlock filesystem rights, with the ABI that introduced each.
_FS_RIGHTS = (
    (1 << 0, 1), (1 << 1, 1), (1 << 2, 1), (1 << 3, 1), (1 << 4, 1), (1 << 5, 1), (1 << 6, 1),
    (1 << 7, 1), (1 << 8, 1), (1 << 9, 1), (1 << 10, 1), (1 << 11, 1), (1 << 12, 1),
    (1 << 13, 2),  # REFER
    (1 << 14, 3),  # TRUNCATE
    (1 << 15, 5),  # IOCTL_DEV
)
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class _Arch:
    audit: int
    syscalls: dict[str, int]
    deny: tuple[str, ...]  # refused with EPERM whatever their arguments


_COMMON_DENY = (
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "execve",
    "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open",
    "pidfd_getfd", "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "mount",
    "umount2", "pivot_root", "chroot", "unshare", "setns", "open_by_handle_at",
    "name_to_handle_at", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "process_madvise",
    "memfd_secret", "tkill",
)

_ARCHES = {
    "x86_64": _Arch(0xC000003E, {
        "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50, "socketpair": 53,
        "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62, "ptrace": 101,
        "rt_sigqueueinfo": 129, "modify_ldt": 154, "pivot_root": 155, "chroot": 161, "acct": 163,
        "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
        "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "tkill": 200,
        "tgkill": 234, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
        "unshare": 272, "accept4": 288, "rt_tgsigqueueinfo": 297, "perf_event_open": 298,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
        "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323,
        "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
        "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "memfd_secret": 447,
        "seccomp": 317,
    }, _COMMON_DENY + ("fork", "vfork", "modify_ldt", "iopl", "ioperm")),
    "aarch64": _Arch(0xC00000B7, {
        "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "quotactl": 60, "acct": 89,
        "unshare": 97, "kexec_load": 104, "init_module": 105, "delete_module": 106,
        "ptrace": 117, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
        "reboot": 142, "socket": 198, "socketpair": 199, "bind": 200, "listen": 201,
        "accept": 202, "connect": 203, "add_key": 217, "request_key": 218, "keyctl": 219,
        "clone": 220, "execve": 221, "swapon": 224, "swapoff": 225, "rt_tgsigqueueinfo": 240,
        "perf_event_open": 241, "accept4": 242, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "bpf": 280, "execveat": 281,
        "userfaultfd": 282, "kexec_file_load": 294, "pidfd_send_signal": 424,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
        "mount_setattr": 442, "memfd_secret": 447, "seccomp": 277,
    }, _COMMON_DENY),
}
# Landlock's system calls have the same numbers on every architecture (the generic table).
_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446


class SandboxError(OSError):
    """The sandbox could not be applied as asked."""


@dataclass(frozen=True)
class SandboxReport:
    landlock_abi: int  # 0 if unavailable
    seccomp: bool  # whether seccomp filters are available / were applied
    applied: tuple[str, ...]  # layers applied, e.g. ("landlock-fs", "seccomp")
    missing: tuple[str, ...]  # sentences for what this kernel lacks

    def summary(self) -> str:
        """One line for a start-up message or `gpupool status`."""
        done = ", ".join(self.applied) if self.applied else "nothing"
        line = f"sandbox: {done}"
        if self.missing:
            line += "; " + "; ".join(self.missing)
        return line


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _syscall(nr: int, *args: object) -> int:
    r = int(_libc.syscall(ctypes.c_long(nr), *args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _landlock_abi() -> int:
    try:
        return _syscall(_SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def _arch() -> _Arch | None:
    return _ARCHES.get(platform.machine())


def _seccomp_available() -> bool:
    return _arch() is not None and _libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) >= 0


def probe() -> SandboxReport:
    """What this kernel supports; changes nothing."""
    abi = _landlock_abi()
    seccomp = _seccomp_available()
    return SandboxReport(abi, seccomp, (), _missing(abi, seccomp))


def _missing(abi: int, seccomp: bool) -> tuple[str, ...]:
    kernel = platform.release()
    out = []
    if abi == 0:
        out.append(f"Landlock is not available (kernel {kernel}): workers can open files")
    else:
        if abi < 4:
            out.append(f"Landlock ABI {abi} has no TCP rules (seccomp still refuses new sockets)")
        if abi < 6:
            out.append(f"Landlock ABI {abi} has no signal scoping (seccomp still limits kill)")
    if not seccomp:
        out.append(f"seccomp filters are not available ({platform.machine()}, kernel {kernel}): "
                   "workers can create sockets and processes")
    return tuple(out)


# ---- Landlock ---------------------------------------------------------------------------------


def _apply_landlock(abi: int, read_only: Sequence[str], devices: Sequence[str]) -> list[str]:
    handled_fs = 0
    for bit, since in _FS_RIGHTS:
        if abi >= since:
            handled_fs |= bit
    handled_net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("<QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("<QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("<Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _syscall(_SYS_LANDLOCK_CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    try:
        read = (_FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR) & handled_fs
        device = (_FS_READ_FILE | _FS_WRITE_FILE | _FS_IOCTL_DEV) & handled_fs
        for path in read_only:
            _add_path_rule(ruleset, path, read)
        for path in devices:
            _add_path_rule(ruleset, path, device)
        _syscall(_SYS_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    applied = ["landlock-fs"]
    if handled_net:
        applied.append("landlock-net")
    if scoped:
        applied.append("landlock-scope")
    return applied


def _add_path_rule(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(path):
            # Note: a rule on a file may grant only the rights that apply to files.
            access &= _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
        attr = struct.pack("<Qi", access, fd)  # struct landlock_path_beneath_attr, packed
        buf = ctypes.create_string_buffer(attr, len(attr))
        _syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), buf,
                 ctypes.c_uint32(0))
    finally:
        os.close(fd)


# ---- seccomp ----------------------------------------------------------------------------------

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO, _OFF_ARG0_HI = 0, 4, 16, 20


def _filter(arch: _Arch, pid: int) -> list[tuple[int, int, int, int]]:
    """The BPF program: (code, jt, jf, k) per instruction."""
    deny = _RET_ERRNO | errno.EPERM
    nr = arch.syscalls
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ, 1, 0, arch.audit),
        (_RET, 0, 0, _RET_KILL_PROCESS),  # a foreign ABI: its numbers mean other calls
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch.audit == _ARCHES["x86_64"].audit:
        prog += [(_JGE, 0, 1, _X32_SYSCALL_BIT), (_RET, 0, 0, deny)]
    for name in arch.deny:
        prog += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, deny)]
    prog += [(_JEQ, 0, 1, nr["clone3"]), (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS)]
    # clone: threads only.
    prog += [
        (_JEQ, 0, 4, nr["clone"]),
        (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
        (_JSET, 0, 1, _CLONE_THREAD),
        (_RET, 0, 0, _RET_ALLOW),
        (_RET, 0, 0, deny),
    ]
    # Signals: only to this process (its pid as the first argument).
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        prog += [
            (_LD_W_ABS, 0, 0, _OFF_NR),
            (_JEQ, 0, 6, nr[name]),
            (_LD_W_ABS, 0, 0, _OFF_ARG0_HI),
            (_JEQ, 0, 3, 0),
            (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
            (_JEQ, 0, 1, pid),
            (_RET, 0, 0, _RET_ALLOW),
            (_RET, 0, 0, deny),
        ]
    prog.append((_RET, 0, 0, _RET_ALLOW))
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _apply_seccomp(arch: _Arch) -> None:
    prog = _filter(arch, os.getpid())
    raw = b"".join(struct.pack("<HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    _syscall(arch.syscalls["seccomp"], ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
             ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))


# ---- the whole ----------------------------------------------------------------------------------


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def restrict(read_only: Sequence[str], devices: Sequence[str] = (), allow_threads: bool = False) -> SandboxReport:
    """Sandbox this process (see the module's docstring); returns what was applied.

    Raises `SandboxError` if other threads run (Landlock would not cover them) or a layer the
    kernel offers fails to apply; layers the kernel lacks are reported, not raised."""
    if not allow_threads and thread_count() > 1:
        raise SandboxError(errno.EBUSY, f"{thread_count()} threads run: sandbox a process before it starts threads")
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SandboxError(e, f"cannot set no_new_privs: {os.strerror(e)}")
    abi = _landlock_abi()
    applied: list[str] = []
    try:
        if abi:
            applied += _apply_landlock(abi, read_only, devices)
        arch = _arch()
        seccomp = arch is not None and _seccomp_available()
        if seccomp and arch is not None:
            _apply_seccomp(arch)
            applied.append("seccomp")
    except OSError as e:
        raise SandboxError(e.errno or errno.EPERM, f"cannot apply the sandbox: {e}") from e
    return SandboxReport(abi, seccomp, tuple(applied), _missing(abi, seccomp))
