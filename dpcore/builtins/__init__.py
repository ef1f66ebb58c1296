"""dpcore's built-in plugins.

Each subpackage is one entry point of the ``dpcore`` group (see the root
``pyproject.toml``) and registers its components through the public hooks, exactly
as a third-party package would. The core never imports this package.
"""
