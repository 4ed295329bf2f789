"""The on-host updater: A/B /usr slots, TUF downloads, boot counting and rollback."""
