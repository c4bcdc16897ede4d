"""Example agents: real applications of the mailbox, importable by workers through
MAILBOX_AGENT_MODULES (e.g. `MAILBOX_AGENT_MODULES=examples.openai_chat`). They are run from
the project root like everything else (the `mailbox` package must come first on sys.path)."""
