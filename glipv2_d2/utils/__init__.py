"""Helpers shared by the data and engine packages."""
