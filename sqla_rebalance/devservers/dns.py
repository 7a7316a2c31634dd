"""DNS: :class:`DnsServer`, a real dnsmasq on 127.0.0.1 serving records that a test rewrites."""

from __future__ import annotations

import ipaddress
import itertools
import os
import pwd
import re
import signal
import socket
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from ._common import (
    LOCALHOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _optional_module,
    _poll,
    _running_as_root,
    find_program,
)
from ._process import _StandaloneServer

DNS_PORT_ENV = "SQLA_REBALANCE_DNS_PORT"

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class DnsServer(_StandaloneServer):
    """A real dnsmasq on ``127.0.0.1:PORT``, the only authority for names under ``.test``.

    It answers from a hosts file (``--addn-hosts``) that :meth:`set` rewrites -- then it sends
    SIGHUP and waits until dnsmasq serves the new records. Names under the domain without
    records get NXDOMAIN, a name with A records only gets NODATA for AAAA (at once, no timeout),
    other domains get REFUSED. Records have a TTL of ``ttl`` seconds (``--local-ttl``).
    :meth:`stop` is an outage: queries time out (the port stays bound by a socket that never
    answers) until :meth:`start`. ``port`` defaults to ``$SQLA_REBALANCE_DNS_PORT`` or a port
    free for UDP and TCP, kept across restarts. Waiting uses dnspython.
    """

    kind = "dnsmasq"
    port_env = DNS_PORT_ENV
    dir_prefix = "sqla-rebalance-dns-"

    def __init__(
        self,
        port: int | None = None,
        *,
        ttl: int = 1,
        domain: str = "test",
        host: str = LOCALHOST,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if int(ttl) != ttl or ttl < 0:
            raise ValueError(f"ttl must be a whole number of seconds >= 0, not {ttl!r}")
        domain = domain.lower().strip(".")
        if not domain or not all(_DNS_LABEL.match(label) for label in domain.split(".")):
            raise ValueError(f"not a domain name: {domain!r}")
        self.ttl = int(ttl)
        self.domain = domain
        self._records: dict[str, tuple[str, ...]] = {}
        self._held: list[socket.socket] = []  # while stopped: the port, bound but never answering
        self._names = itertools.count(1)
        super().__init__(host, port, directory)
        # dnsmasq drops root privileges (to 'nobody') and then still reads the hosts file.
        self.directory.chmod(0o755)
        self._write_hosts()

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form of the pool's ``dns_nameservers=`` entries."""
        return self.address

    @property
    def hosts_file(self) -> Path:
        return self.directory / "hosts"

    @property
    def logfile(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def records(self) -> dict[str, list[str]]:
        """The records now served: ``{name: [address, ...]}``."""
        return {name: list(addresses) for name, addresses in self._records.items()}

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<DnsServer {self.nameserver} .{self.domain} {state} {self.directory}>"

    def new_name(self, prefix: str = "db") -> str:
        """A name under the domain not handed out before by this server: ``db-1.test``, ..."""
        return f"{prefix}-{next(self._names)}.{self.domain}"

    # ----------------------------------------------------------------- records

    def set(self, name: str, addresses: Iterable[str], timeout: float = 10.0) -> None:
        """Make ``name`` resolve to exactly ``addresses`` (IPv4 -> A, IPv6 -> AAAA records; only
        loopback addresses) and wait until the server answers so. An empty list removes the name
        (NXDOMAIN). While the server is stopped, the records are served once it starts again."""
        name = self._check_name(name)
        parsed = [ipaddress.ip_address(address) for address in addresses]
        outside = [str(address) for address in parsed if not address.is_loopback]
        if outside:
            raise ValueError(f"only loopback addresses may be served, not {', '.join(outside)}")
        if parsed:
            self._records[name] = tuple(dict.fromkeys(str(address) for address in parsed))
        else:
            self._records.pop(name, None)
        self._write_hosts()
        if self.is_running() and self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)  # re-read the hosts file
            v4 = {str(a) for a in parsed if a.version == 4}
            v6 = {str(a) for a in parsed if a.version == 6}
            self._wait_served(name, v4, v6, time.monotonic() + timeout)

    def remove(self, name: str, timeout: float = 10.0) -> None:
        """Remove ``name`` (NXDOMAIN from now on); waits like :meth:`set`."""
        self.set(name, [], timeout)

    def resolver(self, timeout: float = 2.0) -> Any:
        """A ``dns.resolver.Resolver`` asking only this server (no search list, no cache)."""
        resolver = _dns_resolver().Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = timeout
        return resolver

    def lookup(self, name: str, rdtype: str = "A", timeout: float = 2.0) -> list[str] | None:
        """The sorted addresses this server answers for ``name``: None for NXDOMAIN, ``[]`` for
        NODATA. dnspython's exceptions otherwise (``dns.resolver.LifetimeTimeout`` on an outage)."""
        resolver_module = _dns_resolver()
        try:
            answer = self.resolver(timeout).resolve(name, rdtype)
        except resolver_module.NXDOMAIN:
            return None
        except resolver_module.NoAnswer:
            return []
        return sorted(record.to_text() for record in answer)

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start dnsmasq (no-op if running) and wait until it answers queries."""
        if self.is_running():
            return
        self._release_port()
        super().start(timeout)

    def stop(
        self, mode: str = "fast", timeout: float = STOP_TIMEOUT, *, silent: bool = True
    ) -> None:
        """Stop dnsmasq: a DNS outage. With ``silent`` (default), the port stays bound by
        sockets that never answer, so that queries time out as with a host that went away
        (instead of UDP "port unreachable" errors) and nobody else takes the port."""
        was_started = self._proc is not None
        super().stop(mode, timeout)
        if silent and was_started:
            self._hold_port()

    def close(self) -> None:
        super().close()
        self._release_port()

    # ----------------------------------------------------------------- internals

    def _check_name(self, name: str) -> str:
        name = name.lower().rstrip(".")
        labels = name.split(".")
        if not name.endswith(f".{self.domain}") or not all(map(_DNS_LABEL.match, labels)):
            raise ValueError(f"{name!r} is not a host name under .{self.domain}")
        return name

    def _write_hosts(self) -> None:
        lines = ["# Written by sqla_rebalance.devservers (DnsServer)\n"]
        for name, addresses in sorted(self._records.items()):
            lines += [f"{address} {name}\n" for address in addresses]
        temporary = self.directory / ".hosts.new"
        temporary.write_text("".join(lines))
        temporary.chmod(0o644)
        os.replace(temporary, self.hosts_file)  # never a half-written file for dnsmasq

    def _wait_served(
        self, name: str, v4: AbstractSet[str], v6: AbstractSet[str], deadline: float
    ) -> None:
        dns_exception = _optional_module("dns.exception")
        assert dns_exception is not None  # imported with dns.resolver
        seen: list[object] = []

        def served() -> bool:
            try:
                a = self.lookup(name, "A", timeout=0.5)
                if not (v4 or v6):
                    seen[:] = [a]
                    return a is None
                aaaa = self.lookup(name, "AAAA", timeout=0.5)
            except dns_exception.DNSException as exc:
                seen[:] = [exc]
                return False
            seen[:] = [a, aaaa]
            return a is not None and aaaa is not None and (set(a), set(aaaa)) == (v4, v6)

        if not _poll(served, deadline):
            wanted = sorted(v4 | v6) or "NXDOMAIN"
            raise RuntimeError(
                f"dnsmasq on {self.nameserver} does not serve {name} -> {wanted} in time "
                f"(answers: {seen}); last lines of {self.logfile}:\n{self.log_tail()}"
            )

    def _needs_udp(self) -> bool:
        return True

    def _launch(self) -> None:
        self._write_hosts()
        argv = [
            str(find_program("dnsmasq", "dnsmasq")),
            "--conf-file=/dev/null",  # not /etc/dnsmasq.conf
            "--keep-in-foreground",  # our child: no daemon, no pid file games
            "--log-facility=-",  # stderr, i.e. self.logfile
            "--log-queries",
            f"--listen-address={self.host}",
            "--bind-interfaces",  # bind 127.0.0.1:PORT only, not the wildcard address
            f"--port={self.port}",
            "--no-resolv",  # no upstream servers
            "--no-hosts",  # not /etc/hosts
            f"--addn-hosts={self.hosts_file}",
            f"--local=/{self.domain}/",  # authoritative: unknown names NXDOMAIN, not forwarded
            f"--local-ttl={self.ttl}",
            f"--pid-file={self.directory / 'dnsmasq.pid'}",
        ]
        if not _running_as_root():
            argv.append(f"--user={pwd.getpwuid(os.geteuid()).pw_name}")  # cannot switch users
        self._spawn(argv, cwd=self.directory)

    def _ready(self) -> bool:
        """True once dnsmasq answers a query (TCP first: a closed UDP port looks like a hang)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        dns_exception = _optional_module("dns.exception")
        if _optional_module("dns.resolver") is None or dns_exception is None:
            return True
        try:
            self.lookup(f"ready-probe.{self.domain}", timeout=0.5)
        except dns_exception.Timeout:
            return False
        except dns_exception.DNSException:
            return True  # an answer, if an unexpected one
        return True

    def _hold_port(self) -> None:
        if self._held:
            return
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._held = [udp, tcp]
        for sock in self._held:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        tcp.listen(16)  # connections complete but never get an answer

    def _release_port(self) -> None:
        for sock in self._held:
            sock.close()
        self._held = []


def _dns_resolver() -> Any:
    module = _optional_module("dns.resolver")
    if module is None:
        raise RuntimeError("DnsServer needs dnspython (pip install dnspython)")
    return module
