"""Tasks: one module each (realm, orqa, rag; ict and dpr in retriever), registered under
their `config.task` name; `get(name)` gives the class. See base.py for what a task provides."""

from realm_jax.tasks import orqa, rag, realm, retriever  # noqa: F401  (registers them)
from realm_jax.tasks.base import TASKS, Answer, Answerer, Hook, Passage, Task, get, register

__all__ = ["TASKS", "Answer", "Answerer", "Hook", "Passage", "Task", "get", "register"]
