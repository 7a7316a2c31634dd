"""The test servers: a re-export of :mod:`sqla_rebalance.devservers`, where they live.

Kept so that the tests' ``from .servers import ...`` and ``python -m tests.servers KIND`` go on
working; see the package's docstring for the servers themselves.
"""

from __future__ import annotations

import sys

from sqla_rebalance.devservers import (
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    BINDIR_ENV,
    DNS_PORT_ENV,
    FIRST_ADDRESS,
    LOCALHOST,
    MARIADB_ADDRESS,
    MARIADB_PORT_ENV,
    PORT_ENV,
    REDIS_PORT_ENV,
    REPLICA_ADDRESS,
    START_TIMEOUT,
    STOP_TIMEOUT,
    DnsServer,
    MariaDBCluster,
    MariaDBServer,
    PostgresCluster,
    PostgresReplicaPair,
    PostgresServer,
    RedisSentinel,
    RedisServer,
    default_parent_dir,
    find_free_port,
    find_pg_bindir,
    find_program,
    loopback_addresses,
    main,
)

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
    "RedisSentinel",
    "RedisServer",
    "default_parent_dir",
    "find_free_port",
    "find_pg_bindir",
    "find_program",
    "loopback_addresses",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
