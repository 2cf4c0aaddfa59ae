-- Runs once, when the postgres volume is created: the Prefect database is POSTGRES_DB, MLflow gets its own.
CREATE DATABASE mlflow OWNER lesionflow;
