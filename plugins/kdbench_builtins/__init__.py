"""kdbench built-in plugins: tasks, models, students, losses, teacher-update rules, methods.

They use exactly the hooks a third-party plugin uses (see kdbench/hookspecs.py).
"""
