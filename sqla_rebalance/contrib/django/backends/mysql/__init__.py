"""MySQL and MariaDB (mysqlclient, or PyMySQL) with connections from ``RebalancingQueuePool``."""
