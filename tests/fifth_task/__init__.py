"""A fifth task defined only here, to show that a task folder is all a new task needs: a logistic
scorer of two numbers ("is this reading a fault?"), served by the unchanged app when this package is
named in TASK_MODULES (tests/contract/test_fifth_task.py)."""
