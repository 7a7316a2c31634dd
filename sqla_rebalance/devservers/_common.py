"""Helpers shared by every kind of server: programs and system accounts, ports, directories.

Standard library only; nothing here starts a server.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import pwd
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

LOCALHOST = "127.0.0.1"  # RedisServer, DnsServer
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

APP_USER = "app"
APP_PASSWORD = "app"
APP_DATABASE = "app"

_UNIX_SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- programs


def install_hint(package: str) -> str:
    return f"install it with scripts/install-system-deps.sh (Debian: apt-get install {package})"


def find_program(name: str, package: str) -> Path:
    """``name`` on ``PATH`` or in the ``sbin`` directories; RuntimeError naming the package."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise RuntimeError(f"{name} not found; {install_hint(package)}")
    return Path(found)


@functools.cache
def _optional_module(name: str) -> ModuleType | None:
    """An optional client library (psycopg, pymysql, dns.resolver), or None if not installed."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


# --------------------------------------------------------------------------- system accounts


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _account(name: str, what: str, hint: str) -> pwd.struct_passwd | None:
    """The system account ``what`` runs as: ``name`` when we are root, else None (ourselves)."""
    if not _running_as_root():
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, but there is no {name!r} system user to run {what} as; {hint}"
        ) from None


def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments that run the child as ``account`` (None: ourselves)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _chown(account: pwd.struct_passwd | None, *paths: Path) -> None:
    if account is not None:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)


def _run_as(
    account: pwd.struct_passwd | None,
    argv: list[str],
    what: str,
    *,
    cwd: Path,
    stdin: str | None = None,
) -> str:
    """Run a program as ``account``; RuntimeError with its output on failure."""
    proc = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,  # never the caller's cwd: /root is not readable by postgres or mysql
        check=False,
        timeout=300,
        **_as_account(account),
    )
    output: str = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{_tail(output, 40)}"
        )
    return output


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- ports and addresses


def _port_is_free(host: str, port: int, *, udp: bool = False) -> bool:
    kinds = [socket.SOCK_STREAM, socket.SOCK_DGRAM] if udp else [socket.SOCK_STREAM]
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            # The servers set SO_REUSEADDR too: TIME_WAIT leftovers must not count as "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def find_free_port(hosts: Iterable[str], attempts: int = 200, *, udp: bool = False) -> int:
    """A port on which every one of ``hosts`` can listen (with ``udp``: for UDP as well).

    Chosen at random below the Linux ephemeral range (32768+), so that outgoing client
    connections never hold it. Another process may still take it before the server binds;
    the first start of a cluster or server retries with another port when that happens.
    """
    hosts = list(hosts)
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(20000, 32000)
        if all(_port_is_free(host, port, udp=udp) for host in hosts):
            return port
    raise RuntimeError(f"no free port shared by {', '.join(hosts)} after {attempts} attempts")


def _port_from_env(port: int | None, env: str) -> int | None:
    if port is None and os.environ.get(env):
        return int(os.environ[env])
    return port


def loopback_addresses(n: int, first: str) -> list[str]:
    """``n`` consecutive addresses from ``first``, all in 127.0.0.0/8 (ValueError otherwise)."""
    start = ipaddress.IPv4Address(first)
    addresses = [start + i for i in range(n)]
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    if not all(a in loopback and a != loopback.broadcast_address for a in addresses):
        raise ValueError(f"{n} addresses from {first} do not all fit in 127.0.0.0/8")
    return [str(a) for a in addresses]


# --------------------------------------------------------------------------- directories


def default_parent_dir() -> str | None:
    """Where temporary data directories go: ``/dev/shm`` (RAM) unless ``$TMPDIR`` says otherwise.

    None means the usual temporary directory. On a virtual disk, copying the template and
    starting the servers is several times slower than in memory (measured: 4 servers in 4.2 s on
    ext4, 1.2 s on tmpfs), and the data is throw-away.
    """
    if os.environ.get("TMPDIR"):
        return None
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK | os.X_OK) and stat.f_bavail * stat.f_frsize >= 2 * 1024**3:
        return shm
    return None


def _copy_trees(source: Path, destinations: Iterable[Path]) -> None:
    """``cp -a`` (owner and modes kept) of ``source`` to every destination, in parallel."""
    copies = []
    for destination in destinations:
        argv = ["cp", "-a", "--reflink=auto", str(source), str(destination)]
        copies.append((argv, subprocess.Popen(argv, stderr=subprocess.PIPE)))
    for argv, proc in copies:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")


# --------------------------------------------------------------------------- processes


def _poll(
    condition: Callable[[], bool], deadline: float, *, first: float = 0.002, longest: float = 0.1
) -> bool:
    """Call ``condition()`` until it is true (True) or ``deadline`` passes (False)."""
    interval = first
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, longest)
    return True


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, ()))
    return found
