"""`huabi serve`: the A1111-compatible REST API, the job queue and gallery (SQLite), and the web UI.

Engine access goes through runner.py only. Nothing here is imported by the rest of huabi.
"""
