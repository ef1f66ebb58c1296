"""Built-in examples used by ``dpcore train`` when no config is given."""
