"""What the scripts at the top of the repository share; docs/development.md maps its modules and layers."""
