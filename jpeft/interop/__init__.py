"""Reading and writing other libraries' adapter files."""
