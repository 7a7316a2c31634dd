"""MariaDB: ``n`` independent servers (:class:`MariaDBCluster`) of :class:`MariaDBServer`.

``mariadb-install-db`` runs once into a template that is copied for every instance. As root, the
servers run as the ``mysql`` system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from ._cluster import _Cluster
from ._common import (
    _UNIX_SOCKET_PATH_MAX,
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    _account,
    _chown,
    _copy_trees,
    _optional_module,
    _run_as,
    find_program,
    install_hint,
)
from ._process import _ServerProcess

MARIADB_PORT_ENV = "SQLA_REBALANCE_MARIADB_PORT"
MARIADB_ADDRESS = "127.0.0.12"  # MariaDBCluster: 127.0.0.12, .13, ...

# mariadbd options for the template (mariadb-install-db) and every instance: small and fast,
# throw-away data. /dev/shm (tmpfs) has neither O_DIRECT nor native AIO.
MARIADB_COMMON_OPTIONS: tuple[str, ...] = (
    "--innodb-data-file-path=ibdata1:4M:autoextend",  # must stay the same for the copies
    "--innodb-autoextend-increment=4",
    "--innodb-log-file-size=4M",
    "--innodb-buffer-pool-size=32M",
    "--innodb-use-native-aio=0",
    "--innodb-flush-method=fsync",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--performance-schema=OFF",
)
# SQL run once into the template by mariadb-install-db (bootstrap mode runs with the grant tables
# disabled; FLUSH PRIVILEGES enables them so that CREATE USER works).
MARIADB_BOOTSTRAP_SQL = f"""\
FLUSH PRIVILEGES;
CREATE DATABASE {APP_DATABASE};
CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'%' WITH GRANT OPTION;
"""


def _mysql_account() -> pwd.struct_passwd | None:
    return _account("mysql", "MariaDB", install_hint("mariadb-server"))


# --------------------------------------------------------------------------- MariaDB


class MariaDBServer(_ServerProcess):
    """One MariaDB instance listening on ``host:port`` only (``--skip-name-resolve``).

    ``directory`` holds ``data/`` (already initialised, e.g. by :class:`MariaDBCluster`), the
    Unix socket, the pid file and ``mariadb.log``. ``settings`` are extra ``mariadbd`` options
    (``{"max_connections": "300"}`` -> ``--max-connections=300``).
    """

    kind = "MariaDB"

    def __init__(
        self,
        host: str,
        port: int,
        directory: str | os.PathLike[str],
        *,
        settings: Mapping[str, str] | None = None,
        mariadbd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.directory = Path(directory)
        self.settings = dict(settings or {})
        self._mariadbd = Path(mariadbd) if mariadbd is not None else None
        self._proc = None

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_path(self) -> Path:
        return self.directory / "mysqld.sock"

    @property
    def logfile(self) -> Path:
        return self.directory / "mariadb.log"

    @property
    def mariadbd(self) -> Path:
        if self._mariadbd is None:
            self._mariadbd = find_program("mariadbd", "mariadb-server")
        return self._mariadbd

    def url(
        self,
        driver: str | None = "pymysql",
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        database: str = APP_DATABASE,
    ) -> str:
        """A SQLAlchemy URL: ``mysql+pymysql://app:app@127.0.0.12:PORT/app``
        (``driver=None`` gives a plain ``mysql://`` URL)."""
        scheme = f"mysql+{driver}" if driver else "mysql"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<MariaDBServer {self.address} {state} {self.directory}>"

    def _launch(self) -> None:
        if not (self.datadir / "mysql").is_dir():
            raise RuntimeError(f"{self.datadir} is not an initialised MariaDB data directory")
        if len(str(self.socket_path)) > _UNIX_SOCKET_PATH_MAX:
            raise RuntimeError(f"Unix socket path too long ({self.socket_path})")
        argv = [
            str(self.mariadbd),
            "--no-defaults",  # never /etc/mysql/my.cnf
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.directory / 'mysqld.pid'}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            "--skip-name-resolve",
            "--host-cache-size=0",  # never "host blocked because of many connection errors"
            "--max-connections=200",
            *MARIADB_COMMON_OPTIONS,
            *(f"--{name.replace('_', '-')}={value}" for name, value in self.settings.items()),
        ]  # no --log-error: the log goes to stderr, i.e. to self.logfile
        self._spawn(argv, cwd=self.directory, account=_mysql_account())

    def _ready(self) -> bool:
        """True once the server accepts an ``app`` login over TCP."""
        pymysql = _optional_module("pymysql")
        if pymysql is not None:
            try:
                conn = pymysql.connect(
                    host=self.host,
                    port=self.port,
                    user=APP_USER,
                    password=APP_PASSWORD,
                    database=APP_DATABASE,
                    connect_timeout=5,
                )
            except pymysql.err.MySQLError:
                return False
            conn.close()
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
        except OSError:
            return False
        admin = find_program("mariadb-admin", "mariadb-client")
        argv = [str(admin), "--no-defaults", f"--host={self.host}", f"--port={self.port}"]
        argv += [f"--user={APP_USER}", f"--password={APP_PASSWORD}", "--connect-timeout=5", "ping"]
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0


class MariaDBCluster(_Cluster[MariaDBServer]):
    """``n`` independent MariaDB servers on 127.0.0.12, 127.0.0.13, ... sharing one port.

    Every instance has a database ``app`` and a user ``app`` (password ``app``, all privileges,
    from any host). ``port`` defaults to ``$SQLA_REBALANCE_MARIADB_PORT`` or a free one;
    ``settings`` are extra ``mariadbd`` options for every instance.
    """

    kind = "MariaDB"
    port_env = MARIADB_PORT_ENV
    first_address = MARIADB_ADDRESS
    dir_prefix = "sqla-rebalance-mariadb-"
    server_dir_prefix = "mariadb"

    def __init__(
        self,
        n: int = 2,
        base_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(n, base_dir, port, settings=settings)

    def _new_server(
        self, host: str, directory: Path, settings: Mapping[str, str] | None
    ) -> MariaDBServer:
        return MariaDBServer(host, self.port, directory, settings=settings)

    def _prepare(self) -> None:
        mariadbd = find_program("mariadbd", "mariadb-server")
        self._install_db = find_program("mariadb-install-db", "mariadb-server")
        for server in self.servers:
            server._mariadbd = mariadbd

    def _create(self) -> None:
        """mariadb-install-db once into ``template/``, then ``cp -a`` it for every instance."""
        account = _mysql_account()
        _chown(account, self.base_dir)
        template = self.base_dir / "template"
        shutil.rmtree(template, ignore_errors=True)
        bootstrap = self.base_dir / "bootstrap.sql"
        # mariadb-install-db also makes root@<hostname>, which --skip-name-resolve warns about.
        hostname = socket.gethostname().replace("'", "")
        bootstrap.write_text(f"{MARIADB_BOOTSTRAP_SQL}DROP USER IF EXISTS 'root'@'{hostname}';\n")
        bootstrap.chmod(0o644)
        _run_as(
            account,
            [
                str(self._install_db),
                "--no-defaults",
                f"--datadir={template}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                f"--extra-file={bootstrap}",
                *MARIADB_COMMON_OPTIONS,
            ],
            "mariadb-install-db",
            cwd=self.base_dir,
        )
        for server in self.servers:
            shutil.rmtree(server.directory, ignore_errors=True)
            server.directory.mkdir(mode=0o700)
            _chown(account, server.directory)
        _copy_trees(template, (server.datadir for server in self.servers))
        shutil.rmtree(template, ignore_errors=True)
        bootstrap.unlink()
