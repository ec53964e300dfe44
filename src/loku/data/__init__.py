"""Forget and retain data: files in, tokenized batches out."""
