"""The one error type preprocessing raises for bad input."""
from __future__ import annotations


class PreprocessError(ValueError):
    """Bad input for one patient: the message is one line naming the patient, the file and the problem."""

    def __init__(self, patient: str, where: str, problem: str) -> None:
        self.patient = patient
        self.where = where
        self.problem = " ".join(str(problem).split())  # one line, whatever the library said
        super().__init__(f"{patient}: {where}: {self.problem}" if where else f"{patient}: {self.problem}")
