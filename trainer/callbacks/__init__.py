"""Compression techniques as Lightning callbacks, one file each (imported by class path)."""
