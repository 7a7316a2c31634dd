"""Private database, DNS and cache servers on loopback addresses, for development, tests,
benchmarks and ``sqla-rebalance demo --postgres``.

These start the **real server programs** (PostgreSQL, MariaDB, Redis, dnsmasq; installed
separately, e.g. with ``apt-get``) as children of this process, on loopback addresses only
(127.0.0.x), with throw-away data in temporary directories. The library itself never imports
this package: a pool in production has nothing to do with it.

Several independent instances listen on distinct loopback addresses -- all on the *same* port --
so they look like distinct hosts; stopping one is a real host failure. Every server program is a
direct child of this process (its state is known without polling files) and writes its output to
a log file, whose last lines are in the error when it cannot start. Standard library only; the
client libraries (psycopg, pymysql, dnspython) are used when they are importable::

    from sqla_rebalance.devservers import PostgresCluster

    with PostgresCluster(n=3) as cluster:
        for server in cluster.servers:
            print(server.url())     # postgresql+psycopg://app:app@127.0.0.2:PORT/app
        cluster.servers[1].stop()   # host failure
        cluster.servers[1].restart()
        with cluster.servers[2].frozen():  # a hung host (SIGSTOP), thawed after the block
            ...

Kinds (``python -m sqla_rebalance.devservers KIND`` starts one and keeps it up until
interrupted):

``PostgresCluster`` (``postgres``; module ``postgres``)
    ``n`` independent PostgreSQL servers on 127.0.0.2, 127.0.0.3, ...; role ``app`` (password
    ``app``, SUPERUSER) owning a database ``app``.
``PostgresReplicaPair`` (``replica``; module ``postgres``)
    a streaming-replication primary on 127.0.0.8 and its hot standby on 127.0.0.9 (same port).
``MariaDBCluster`` (``mariadb``; module ``mariadb``)
    ``n`` independent MariaDB servers on 127.0.0.12, 127.0.0.13, ...; user ``app`` (password
    ``app``, all privileges, from any host) and a database ``app``.
``RedisServer`` (``redis``; module ``redis``)
    one Redis on 127.0.0.1, without persistence (a replica with
    ``settings={"replicaof": "127.0.0.1 PORT"}``); ``RedisSentinel`` watches one and
    fails over to a replica within seconds; ``RedisCluster`` is N masters (and replicas)
    in cluster mode, ``redis+cluster://`` URL.
``DnsServer`` (``dns``; module ``dns``)
    one dnsmasq on 127.0.0.1, authoritative for ``*.test``, answering from a hosts file that
    :meth:`DnsServer.set` rewrites (and waits until the new records are served).

The modules ``_common`` (programs, accounts, ports, directories), ``_process`` (one server
process: start, stop, freeze/thaw, clean-up at exit) and ``_cluster`` (``n`` servers on one port)
hold what the kinds share.

Environment:

``SQLA_REBALANCE_PG_PORT``, ``SQLA_REBALANCE_MARIADB_PORT``, ``SQLA_REBALANCE_REDIS_PORT``,
``SQLA_REBALANCE_DNS_PORT``
    the port to use when none is given (default: a free port, found by binding on every address).
``TMPDIR``
    where the temporary data directories go; if unset, ``/dev/shm`` when it has 2 GB free
    (several times faster than a virtual disk), else the usual temporary directory.
``SQLA_REBALANCE_PG_BINDIR``
    directory holding ``initdb``/``postgres`` (default: the newest ``/usr/lib/postgresql/*/bin``,
    then ``pg_config --bindir``, then ``PATH``).

PostgreSQL refuses to run as root: as root, every PostgreSQL program runs as the ``postgres``
system user (the child process switches user before ``exec``, like ``runuser -u postgres``),
MariaDB as ``mysql`` and Redis as ``redis``; dnsmasq drops its privileges itself. As any other
user, the programs run as that user. Servers still running at interpreter exit are stopped and
their temporary directories removed.
"""

from __future__ import annotations

from ._cli import main
from ._common import (
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    LOCALHOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    default_parent_dir,
    find_free_port,
    find_program,
    loopback_addresses,
)
from .dns import DNS_PORT_ENV, DnsServer
from .mariadb import MARIADB_ADDRESS, MARIADB_PORT_ENV, MariaDBCluster, MariaDBServer
from .postgres import (
    BINDIR_ENV,
    FIRST_ADDRESS,
    PORT_ENV,
    REPLICA_ADDRESS,
    PostgresCluster,
    PostgresReplicaPair,
    PostgresServer,
    find_pg_bindir,
)
from .redis import REDIS_PORT_ENV, RedisCluster, RedisSentinel, RedisServer

__all__ = [
    "APP_DATABASE",
    "APP_PASSWORD",
    "APP_USER",
    "BINDIR_ENV",
    "DNS_PORT_ENV",
    "FIRST_ADDRESS",
    "LOCALHOST",
    "MARIADB_ADDRESS",
    "MARIADB_PORT_ENV",
    "PORT_ENV",
    "REDIS_PORT_ENV",
    "REPLICA_ADDRESS",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "DnsServer",
    "MariaDBCluster",
    "MariaDBServer",
    "PostgresCluster",
    "PostgresReplicaPair",
    "PostgresServer",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "default_parent_dir",
    "find_free_port",
    "find_pg_bindir",
    "find_program",
    "loopback_addresses",
    "main",
]
