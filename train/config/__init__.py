"""Configs: resolvers, composition, and the checks a config passes before anything is built."""
