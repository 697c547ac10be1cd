"""User-facing errors: every message names the node, the input and the fix."""

from __future__ import annotations


class CXRInputError(ValueError):
    """A bad input a user can fix. Raised by nodes (and by core helpers without node context)."""

    def __init__(self, problem: str, *, node: str = "", input_name: str = "", fix: str = ""):
        self.problem = problem
        self.node = node
        self.input_name = input_name
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.node:
            where = f"[{self.node}] "
        if self.input_name:
            where += f"input '{self.input_name}': "
        text = where + self.problem
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def located(self, node: str, input_name: str = "", fix: str = "") -> CXRInputError:
        """The same problem with the node (and input / fix, when not already known) attached."""
        return CXRInputError(
            self.problem,
            node=node,
            input_name=self.input_name or input_name,
            fix=self.fix or fix,
        )
