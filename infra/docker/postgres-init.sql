-- The MLflow database beside Prefect's (POSTGRES_DB) in the same PostgreSQL instance.
CREATE DATABASE mlflow;
