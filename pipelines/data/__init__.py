"""Data: dataset layouts, synthetic radiographs, ingest to parquet shards (Ray Data), transforms and streaming."""
