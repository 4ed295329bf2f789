"""Releases and the TUF update repository they are published to."""
