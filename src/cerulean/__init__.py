"""Cerulean Linux: compose, release, update, guard and manage a minimal Debian-based OS."""

__version__ = "0.1.0"
