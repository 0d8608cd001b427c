"""Datasets: the Parquet manifest schema, the synthetic compositional domain and the curation pipeline."""
