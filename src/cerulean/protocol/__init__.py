"""Documents shared by the parts that talk to each other (standard library only)."""
