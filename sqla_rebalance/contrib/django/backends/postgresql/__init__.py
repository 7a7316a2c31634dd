"""PostgreSQL (psycopg 3, or psycopg2) with connections from ``RebalancingQueuePool``."""
