"""Detector state snapshots and the changelog topic that stores them."""
