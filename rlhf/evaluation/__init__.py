"""Evaluation of the trained actors, and chat with one."""
