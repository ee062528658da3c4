"""Recipes: scripts that wire the library's components into a job (``simoe train``, ``simoe compare``,
``make demo``). Components never import recipes."""
