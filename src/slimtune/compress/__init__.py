"""Post-training compression methods; each module is one method (see its docstring).

Import :mod:`slimtune.recipe` to register them by name.
"""
