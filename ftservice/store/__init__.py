"""The service's database: one store for serving keys and usage now, and for the feedback,
loop and jobs tables that come after (each a migration of its own).

SQLAlchemy 2 over SQLite (WAL, a busy timeout) by default, or PostgreSQL (psycopg 3) by
URL; the schema is Alembic's, upgraded to head when the store is opened.
"""
