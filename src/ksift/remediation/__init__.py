"""Safe automated remediation: per-rule policies, guards, actions, ask mode and outcomes.

Off unless a rule's policy says otherwise; see docs/safety.md for every guarantee and its test.
"""
