"""The admin policy: the file (`file`), where its keys sit (`locate`), the decision (`engine`)."""

from igd.policy.engine import EMPTY_VIEW, Policy, TableView
from igd.policy.file import (
    DEFAULTS_NAME,
    Action,
    Defaults,
    PolicyFileError,
    PolicyIssue,
    Rule,
)

__all__ = [
    "DEFAULTS_NAME",
    "EMPTY_VIEW",
    "Action",
    "Defaults",
    "Policy",
    "PolicyFileError",
    "PolicyIssue",
    "Rule",
    "TableView",
]
