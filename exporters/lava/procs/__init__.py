"""Lava processes and process models (kept alone in this folder: Lava's compiler executes every
module beside a process to find its models)."""
