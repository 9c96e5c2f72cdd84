"""Safe automated remediation: per-rule policies, guards, actions, ask mode and outcomes.

Off unless a rule's policy says otherwise; see docs/safety.md for every guarantee and its test.
"""

# A remediation decision's states (ksift.remediation.decisions). Defined here so that the command
# line's parser, which `ksift run` builds too, names them without importing the decision store
# (sqlite3) before the run's kernel side is loaded (see ksift.compose).
STATUSES = ("dry-run", "refused", "pending", "approved", "rejected", "expired", "done", "failed")
