"""Durable batch jobs: the OpenAI Batch API and gRPC ``BatchJobs`` over one store (SQLite locally,
Redis in a cluster), run at low priority by each router's ``JobRunner``."""
